"""Training and evaluation loops; usable from Python without the command line."""
