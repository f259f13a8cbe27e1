"""Built-in problems, each written only against ganflow's public plug-in API."""
