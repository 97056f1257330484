"""Registry layer: the only package that imports mlflow, split by job.

Each `proxytune apply` is a parent run per experiment; each stage a child run with its params,
metric curves and artifacts. Adapters become registered model versions named
EXPERIMENT.SUBJECT.ROLE, the proxy set a dataset input carrying its content digest, and run tags
carry the links that `proxytune lineage` walks.

    store       tracking URIs, connecting, experiments, git/version/owner tags, ghost runs, server probe,
                where a moved project's artifacts are now
    guard       the store's failures as one line: corrupt, locked or read-only SQLite, a dead server
    runs        parent runs of an apply, a stage's child run (StageRun) and its logging, the report run
    registry    registered versions: names, references, list/show/pull/promote, file verification, gate
    audit       re-hash every version and resolve every lineage link
    lineage     the chain behind a version, evaluation runs and their comparison
    provenance  whether each node of a chain is still current in the project, and its drawing

Import the module you need (`from proxytune.tracking import runs`). Nothing here imports mlflow at
import time: it takes ~1.5 s and most CLI calls never need it (`store.load_mlflow` imports it).
"""
