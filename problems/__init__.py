"""Built-in problems, each written only against ganflow's public plug-in API.

This folder installs as ``ganflow.problems`` (pyproject's ``package-dir``): spec strings name its modules
``ganflow.problems.<module>:<attr>``, and the bundled demo priors under ``data/`` are package data.
"""
