"""The export formats by name, apart from the exports themselves: the command line lists them without loading
pyarrow."""

FORMATS = ("raven", "audacity", "csv", "ebird", "dwc")
