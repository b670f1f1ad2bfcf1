"""The run folder, the contract between training, assessment and deployment: its file names and readers, where a
run may be written, checkpoints, and :class:`~melanoma.runs.run.Run`, a finished run loaded for use."""
