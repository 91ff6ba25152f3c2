"""qconv's own calibration and evaluation text (see README.md here); read through importlib.resources."""
