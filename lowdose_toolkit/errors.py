"""Errors a user can fix. The CLI prints them as one red line and exits with status 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix (recipe, file, argument). The message names the culprit and the fix."""


class RecipeError(UserError):
    """A recipe is invalid; the message starts with the recipe file or dotted key path."""


class DataError(UserError):
    """A data file or folder is unusable; the message names the file and what is wrong."""


class PluginError(UserError):
    """A plugin failed to load or a part could not be found."""
