"""A logged or registered model, served: rebuilt from its run's weights-only checkpoint around its kind's served
module, and (`load_serving`) that module as its kind's `Served`, which takes its own raw inputs, with its
`Origin`: what kind of model it is and which registered version and run answer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tasks.kinds import Kind, get_kind
from tasks.networks import rebuild

if TYPE_CHECKING:
    from tasks.kinds import Served

# a kind of run, as a user names it (a classification run is an image, text or feature classifier: `_noun`)
NOUNS = {"classification": "classifier", "regression": "forecaster", "translation": "translator",
         "speech_recognition": "speech recogniser", "generation": "GAN generator",
         "style_generation": "style-based GAN generator", "image_translation": "image-to-image translator",
         "language_model": "character language model", "word_language_model": "word language model"}


@dataclass
class Origin:
    """Where a served model comes from: its kind in words, its run, and the registered versions of that run."""

    kind: str  # the checkpoint's task: classification, translation, ...
    what: str  # e.g. "a translator (seq2seq on dates)"
    run_id: str
    name: str = ""  # the model's name in params.yaml's models (what `nnlab run --models` takes)
    source: str = ""  # the data it was trained on (data.source)
    version: str = ""  # "nnlab-translator-dates v3 (champion)" when served from the registry
    registered: list[str] = field(default_factory=list)  # every registered version of the run, as above
    epochs: int | None = None
    tags: dict = field(default_factory=dict)  # the run's tags (nnlab.beats_baseline, nnlab.baseline, ...)
    metrics: dict = field(default_factory=dict)  # the run's latest metrics

    def answered(self) -> str:
        """e.g. `nnlab-translator-dates v3 (champion), run <id>`; a run given by id: `run <id>`."""
        return f"{self.version}, run {self.run_id}" if self.version else f"run {self.run_id}"


def load_served(ref: str):
    """(the served module of a logged or registered model, its vocabulary dict or None, its metadata, the pinned
    URI). The module is rebuilt from the run's self-describing checkpoint, read as weights and plain data only,
    through the model registry and the kind's `wrap`: nnlab never unpickles the logged MLflow model (a pickle,
    or a torch.export archive whose weights torch reads with a full unpickler), so a model planted in a shared
    store cannot run code here. The logged model stays what `mlflow models serve` serves."""
    return _rebuilt(ref)[2:]


def load_serving(ref: str) -> "Served":
    """The logged or registered model `ref` as its kind's `Served` (load_served's module, vocabulary, metadata and
    URI): what the serving commands call on raw inputs. Its kind is the checkpoint's `task`; its `origin` (an
    `Origin`) says what it is and which registered version and run it is."""
    kind, final, *served = _rebuilt(ref)
    out = kind.serving(*served)
    out.origin = origin(kind, final, served[1] is not None, served[3])
    return out


def _rebuilt(ref: str) -> tuple[Kind, dict, object, dict | None, dict, str]:
    from tasks.registration import extra_file, load_checkpoint, model_metadata

    final, uri = load_checkpoint(ref)
    if "manifest" not in final:
        raise LookupError(f"{uri}: trained by an older nnlab (its checkpoint does not describe its data); train it "
                          "again to serve it")
    norm, kind = final["normalization"], get_kind(final["task"])
    net = rebuild(final).float()
    served = kind.wrap(net, final["manifest"], norm["mean"], norm["std"]).eval()
    return kind, final, served, extra_file(uri, "vocab.json"), model_metadata(uri), uri


def describe(task: str, final: dict, text: bool) -> str:
    """A checkpoint's model in words: "a translator (seq2seq on dates)", "an image classifier (mlp on digits)"."""
    noun = _noun(task, final, text)
    article = "an" if noun[0] in "aeiou" else "a"
    return f"{article} {noun} ({final.get('arch', '?')} on {final.get('source', '?')})"


def _noun(task: str, final: dict, text: bool) -> str:
    noun = NOUNS.get(task, task.replace("_", " ") + " model")
    if task != "classification":
        return noun
    if text:  # its vocabulary was logged beside it
        return "text classifier"
    shape = final.get("input_shape") or []
    if len(shape) == 3:
        return "image classifier"
    return "series classifier" if final.get("series") else "feature classifier"


def origin(kind: Kind, final: dict, text: bool, uri: str) -> Origin:
    """The served model's `Origin`: its kind in words, its run (tags, metrics, epochs trained) and the registered
    versions of that run (the one `uri` pins first), read from the tracking store."""
    from tasks.store_reader import open_store

    run_id = final["run_id"]
    out = Origin(kind.name, describe(kind.name, final, text), run_id, final.get("name", ""), final.get("source", ""),
                 epochs=final.get("epochs"))
    pinned = tuple(uri[len("models:/"):].split("/")[:2]) if uri.startswith("models:/") else None
    if pinned:
        out.version = f"{pinned[0]} v{pinned[1]}"
    try:
        store = open_store()
        run = store.get_run(run_id)
        out.tags, out.metrics = dict(run.data.tags), dict(run.data.metrics)
        named = {(name, version): f"{name} v{version}" + (f" ({', '.join(aliases)})" if aliases else "")
                 for name, version, aliases in store.run_versions(run_id)}
    except Exception:  # a store that cannot say more: the run id alone
        return out
    if pinned:
        out.version = named.get(pinned, out.version)
    out.registered = sorted(named.values())
    return out


def not_registered_why(o: Origin) -> str:
    """Why a run has no registered version, from what its evaluation tagged ("" when it has one)."""
    if o.registered:
        return ""
    if o.tags.get("nnlab.beats_baseline") == "false":
        return (f"run {o.run_id} was never registered: it does not beat its trivial baseline "
                f"({o.tags.get('nnlab.baseline', '?')})")
    return f"run {o.run_id} was never registered (no registered model holds it)"
