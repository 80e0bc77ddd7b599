"""Running the pipeline on this machine: the local object store (behind its token front) and MLflow server
(``services``, ``store_front``, ``mlflow_store``, ``sandbox``), kfp's local runner with resume and stop
(``runner``, ``runs``), and the ``--runner docker`` containers (``containers``). A cluster run uses none of it."""
