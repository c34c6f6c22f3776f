"""The assayer: scores every active assay's windows as they close, from the inference log."""
