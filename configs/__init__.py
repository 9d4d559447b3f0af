"""The experiment recipes, one file each (installed as ``crate_alpha.configs``)."""
