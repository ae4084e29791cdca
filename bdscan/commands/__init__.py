"""The command line's commands beyond the core scan (repair, study, lab), registered on the app by :mod:`bdscan.cli`."""
