"""The file MLflow runs to build the served model (models-from-code): a registered ferpipe model holds this
file, ferpipe's source (`code/`) and the weights, and no pickled object.

A pickled model is code that runs wherever it is unpickled, and nobody can
read what it will do; this file is three lines anyone can read in the
registry. MLflow executes it on load, after putting the model's bundled `code/`
on the import path, so the served model runs the ferpipe it was exported with.
"""

from mlflow.models import set_model

from ferpipe.serving.pyfunc import EnsembleModel

set_model(EnsembleModel())
