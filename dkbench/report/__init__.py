"""Views of the results: figures, the Markdown report, the end-of-run summary."""
