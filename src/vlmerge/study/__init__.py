"""The study: recipe, cached runner, claims, report."""
