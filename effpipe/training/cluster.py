"""This process's place in a multi-worker run, read from TF_CONFIG without TensorFlow.

    TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]},
                "task": {"type": "worker", "index": 0}}'

The chief is the "chief" task, or worker 0 when the cluster names no chief (the
convention of tf.distribute and Keras). Only the chief writes the run's outputs;
the binary decides that before TensorFlow loads, so the other workers never touch
the run directory's config (effpipe.run_dir).
"""

import dataclasses
import json
import os

from effpipe.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Task:
    """One process of a run.

    Attributes:
      type: "chief" or "worker" ("worker" for a run on one machine).
      index: the task's index within its type.
      num_workers: processes that train (chief included).
      is_chief: whether this process writes the run's outputs.
    """

    type: str
    index: int
    num_workers: int
    is_chief: bool


def current_task(strategy: str, environ=os.environ) -> Task:
    """This process's task: from TF_CONFIG under --strategy=multi_worker, else alone.

    Raises:
      UsageError: multi_worker without a TF_CONFIG that names this task.
    """
    if strategy != "multi_worker":
        return Task("worker", 0, 1, True)
    text = environ.get("TF_CONFIG", "")
    try:
        tf_config = json.loads(text)
        cluster, task = tf_config["cluster"], tf_config["task"]
        task_type, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(
            "--strategy=multi_worker needs TF_CONFIG, the JSON that names the cluster and "
            'this task, e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}'
            f" (got {text!r}: {error})"
        ) from error
    num_workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    is_chief = task_type == "chief" or (
        task_type == "worker" and index == 0 and not cluster.get("chief")
    )
    return Task(task_type, index, num_workers, is_chief)
