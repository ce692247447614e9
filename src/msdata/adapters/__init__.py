"""Backends. Each subpackage is the only place that imports its driver, and implements every
port that backend serves. Importing one whose driver is missing raises
:class:`msdata.errors.MissingDependencyError`, naming the extra to install."""
