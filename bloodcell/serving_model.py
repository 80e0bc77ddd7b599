"""The MLflow "model from code" every bloodcell pyfunc model runs (:mod:`bloodcell.serving`): MLflow executes
this file to make the model, so nothing is unpickled."""

import mlflow

from bloodcell.serving import ImageClassifier

mlflow.models.set_model(ImageClassifier())
