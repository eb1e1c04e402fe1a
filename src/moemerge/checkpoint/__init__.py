"""Reading a source model directory, writing a reduced one, and loading it back."""

from moemerge.checkpoint.loader import load_model
from moemerge.checkpoint.source import SourceModel, inspect_source, load_source
from moemerge.checkpoint.writer import write_checkpoint

__all__ = ["SourceModel", "inspect_source", "load_model", "load_source", "write_checkpoint"]
