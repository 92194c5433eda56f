"""A logged or registered model, served: rebuilt from its run's weights-only checkpoint around its kind's served
module, and (`load_serving`) that module as its kind's `Served`, which takes its own raw inputs."""
from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.kinds import Kind, get_kind
from tasks.networks import rebuild

if TYPE_CHECKING:
    from tasks.kinds import Served


def load_served(ref: str):
    """(the served module of a logged or registered model, its vocabulary dict or None, its metadata, the pinned
    URI). The module is rebuilt from the run's self-describing checkpoint, read as weights and plain data only,
    through the model registry and the kind's `wrap`: nnlab never unpickles the logged MLflow model (a pickle,
    or a torch.export archive whose weights torch reads with a full unpickler), so a model planted in a shared
    store cannot run code here. The logged model stays what `mlflow models serve` serves."""
    return _rebuilt(ref)[1:]


def load_serving(ref: str) -> "Served":
    """The logged or registered model `ref` as its kind's `Served` (load_served's module, vocabulary, metadata and
    URI): what the serving commands call on raw inputs. Its kind is the checkpoint's `task`."""
    kind, *served = _rebuilt(ref)
    return kind.serving(*served)


def _rebuilt(ref: str) -> tuple[Kind, object, dict | None, dict, str]:
    from tasks.registration import extra_file, load_checkpoint, model_metadata

    final, uri = load_checkpoint(ref)
    if "manifest" not in final:
        raise LookupError(f"{uri}: trained by an older nnlab (its checkpoint does not describe its data); train it "
                          "again to serve it")
    norm, kind = final["normalization"], get_kind(final["task"])
    net = rebuild(final).float()
    served = kind.wrap(net, final["manifest"], norm["mean"], norm["std"]).eval()
    return kind, served, extra_file(uri, "vocab.json"), model_metadata(uri), uri
