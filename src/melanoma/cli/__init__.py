"""The `melanoma` command line: the verbs (:mod:`melanoma.cli.main`) and their flags (:mod:`melanoma.cli.arguments`).
Kept light: `melanoma --help` imports no torch."""
