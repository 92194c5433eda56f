"""The catalogue of architectures, without torch: each one's family, kind, one-line description, pydantic
options class and the family module that builds it.

`params.yaml` is checked against these options classes (tasks/config.py; unknown option -> error naming it)
without importing a network, and `nnlab models` lists the names, families and descriptions of this table. The
networks are built in the family modules (models/mlp.py, models/cnn.py, ...), which attach their builders with
`@register_model` and import their options from here; `models.registry.create_model` imports the one module it
needs.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FAMILIES = ("mlp", "cnn", "rnn", "transformer", "gan", "transfer", "seq2seq", "speech")


class Options(BaseModel):
    """Base of every architecture's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- mlp (models/mlp.py)

Activation = Literal["relu", "tanh", "sigmoid", "leaky_relu"]


class MLPOptions(Options):
    hidden: list[int] = Field(default=[256, 128], min_length=1)  # widths of the hidden layers
    activation: Activation = "relu"
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)  # after each hidden activation
    batch_norm: bool = False  # BatchNorm1d before each activation


# ---------------------------------------------------------------- cnn (models/cnn.py): simple_cnn

class SimpleCNNOptions(Options):
    filters: list[int] = Field(default=[32, 64, 64], min_length=1)  # one conv per entry, pooling between
    kernel_size: int = Field(default=3, ge=1, le=7)  # of every conv
    padding: Literal["same", "valid"] = "same"  # `same` keeps 8x8 digits from shrinking to nothing
    stride: int = Field(default=1, ge=1, le=2)  # of every conv
    pooling: Literal["max", "avg"] = "max"  # between convs
    dense: int = Field(default=64, ge=1)  # width of the hidden dense layer
    activation: Activation = "relu"  # after each conv and the hidden dense layer
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # before the hidden dense layer
    batch_norm: bool = False  # BatchNorm2d after each conv


# ---------------------------------------------------------------- cnn: vgg

class VGGOptions(Options):
    blocks: list[Annotated[int, Field(ge=1)]] = Field(default=[32, 64, 128], min_length=1)  # conv width of each stage
    convs_per_block: int = Field(default=2, ge=1, le=8)  # 3x3 convs per stage
    padding: Literal["same", "valid"] = "same"  # `valid` shrinks every conv by 2: for large inputs only
    pooling: Literal["max", "avg", "stride"] = "max"  # how a stage halves the map; stride: its first conv strides 2
    batch_norm: bool = True  # BatchNorm2d after each conv (VGG trains poorly from scratch without it)
    activation: Activation = "relu"  # after each conv (and the hidden dense layer)
    dense: int = Field(default=0, ge=0)  # hidden dense layer after global pooling; 0 = none
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # before the head's linear layers


# ---------------------------------------------------------------- cnn: resnet

RESNET_DEPTHS = (8, 14, 20, 26, 32, 44, 56, 110)  # 6n + 2: CIFAR ResNets (He et al. 2016, section 4.2)


class ResNetOptions(Options):
    depth: int = 14  # 6n + 2 layers: stem conv + 3 stages of n two-conv blocks + the linear head
    width: int = Field(default=16, ge=1)  # channels of the first stage; doubled at each later stage
    skip: bool = True  # False drops every shortcut: the same stack as a plain net, to show what skips fix
    stem_stride: int = Field(default=1, ge=1, le=2)  # 2 halves the input at the stem (ignored below 16x16)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # before the linear head

    @field_validator("depth")
    @classmethod
    def _depth(cls, v: int) -> int:
        if v < 8 or (v - 2) % 6:
            raise ValueError(f"resnet depth must be 6n+2 (n >= 1), e.g. {', '.join(map(str, RESNET_DEPTHS))}; got {v}")
        return v


# ---------------------------------------------------------------- cnn: inception

class InceptionOptions(Options):
    stem: int = Field(default=32, ge=1)  # channels of the 3x3 stem conv
    stem_stride: int = Field(default=1, ge=1, le=2)  # 2 halves the input at the stem (ignored below 16x16)
    # output channels of the blocks of each stage (pooling between stages); split over the branches as
    # 1x1: 1/4, 3x3: 1/2 (after a 1/4 reduce), 5x5: 1/8 (after a 1/16 reduce), pool-proj: 1/8
    stages: list[Annotated[int, Field(ge=16, multiple_of=16)]] = Field(default=[64, 128, 256], min_length=1)
    blocks_per_stage: int = Field(default=2, ge=1, le=8)  # inception blocks per stage, all of that stage's width
    pooling: Literal["max", "avg"] = "max"  # between stages
    batch_norm: bool = True  # BatchNorm2d after each conv (GoogLeNet v1 had none; it trains faster with it)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # before the linear head


# ---------------------------------------------------------------- cnn: mobilenet

class MobileNetOptions(Options):
    width_mult: float = Field(default=1.0, gt=0.0, le=4.0)  # scales every layer's channels (rounded to 8)
    expand_ratio: int = Field(default=6, ge=1, le=8)  # inverted residual's hidden/input channels (1st stage: 1)
    stem: int = Field(default=32, ge=8)  # channels of the 3x3 stem conv
    stem_stride: int = Field(default=1, ge=1, le=2)  # 2 halves the input at the stem (ignored below 16x16)
    # [channels, blocks, stride of the stage's first block]: MobileNetV2's table, cut for small images
    stages: list[list[int]] = Field(default=[[16, 1, 1], [24, 2, 2], [32, 3, 2], [64, 3, 2], [96, 2, 1]], min_length=1)
    last: int = Field(default=256, ge=8)  # channels of the final 1x1 conv before pooling
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # before the linear head

    @field_validator("stages")
    @classmethod
    def _stages(cls, v):
        for stage in v:
            if len(stage) != 3 or stage[0] < 1 or stage[1] < 1 or stage[2] not in (1, 2):
                raise ValueError(f"each stage is [channels >= 1, blocks >= 1, stride 1 or 2]; got {stage}")
        return v


# ---------------------------------------------------------------- rnn, transformer (models/sequence.py)

class RecurrentBase(Options):
    hidden: int = Field(default=128, ge=1)  # units per direction and layer
    layers: int = Field(default=1, ge=1, le=8)  # stacked recurrent layers
    bidirectional: bool = False  # a second set of layers reads the sequence backwards; states are concatenated
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # between stacked layers (no effect with layers: 1)
    embedding_dim: int = Field(default=64, ge=1)  # token inputs only: size of each token's embedding
    vocab_size: int | None = Field(default=None, ge=2)  # token inputs only (required there): ids 0..vocab_size-1


class RecurrentOptions(RecurrentBase):
    pooling: Literal["last", "mean"] = "last"  # last: final hidden state (both directions); mean: over valid steps


class AttentionOptions(RecurrentBase):
    cell: Literal["lstm", "gru"] = "lstm"  # the encoder
    score: Literal["additive", "dot"] = "additive"  # additive (Bahdanau): v.tanh(Wq q + Wk h_t); dot: q.h_t / sqrt(D)
    attention_dim: int = Field(default=64, ge=1)  # additive only: size of the hidden layer of the score


class TransformerOptions(Options):
    d_model: int = Field(default=64, ge=2)  # width of every token's representation
    heads: int = Field(default=4, ge=1)  # attention heads; must divide d_model
    layers: int = Field(default=2, ge=1, le=24)  # encoder layers
    ff: int = Field(default=128, ge=1)  # hidden width of each layer's feed-forward block
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)  # on the inputs and inside every layer
    pooling: Literal["mean", "cls"] = "mean"  # mean over valid steps, or a learned [CLS] token's output
    vocab_size: int | None = Field(default=None, ge=2)  # token inputs only (required there): ids 0..vocab_size-1

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of heads ({self.heads})")
        return self


class WordLMOptions(Options):
    cell: Literal["lstm", "gru"] = "lstm"
    embedding_dim: int = Field(default=200, ge=1)  # also the width of the last layer when tied
    hidden: int = Field(default=200, ge=1)
    layers: int = Field(default=2, ge=1, le=8)
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0)  # on embeddings, between layers and before the decoder
    tied: bool = False  # the output layer reuses the input embedding (Press & Wolf 2017; Inan et al. 2017)
    vocab_size: int | None = Field(default=None, ge=2)  # from the data


# ---------------------------------------------------------------- seq2seq (models/seq2seq.py)

class Seq2SeqOptions(Options):
    cell: Literal["gru", "lstm"] = "gru"
    hidden: int = Field(default=64, ge=1)  # units of the decoder and of each encoder direction
    layers: int = Field(default=1, ge=1, le=4)  # stacked encoder layers (the decoder is one cell)
    bidirectional: bool = True  # the encoder also reads the source backwards
    embedding_dim: int = Field(default=32, ge=1)  # source and target token embeddings
    # none: every step sees the same encoder summary (the fair no-attention twin, Cho et al. 2014);
    # additive: Bahdanau et al. 2015, v.tanh(W s + U h_j); dot: Luong et al. 2015 "general", (W s).h_j / sqrt(d)
    attention: Literal["none", "additive", "dot"] = "additive"
    attention_dim: int = Field(default=64, ge=1)  # additive only: width of the score's hidden layer
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)  # on embeddings and the decoder's output layer
    teacher_forcing: float = Field(default=1.0, ge=0.0, le=1.0)  # share of training steps fed the true previous token
    beam_size: int = Field(default=1, ge=1, le=32)  # evaluation and serving: 1 greedy, more: beam search
    vocab_size: int | None = Field(default=None, ge=2)  # source vocabulary (from the data)


class TransformerSeq2SeqOptions(Options):
    d_model: int = Field(default=64, ge=2)
    heads: int = Field(default=4, ge=1)  # must divide d_model
    encoder_layers: int = Field(default=2, ge=1, le=12)
    decoder_layers: int = Field(default=2, ge=1, le=12)
    ff: int = Field(default=128, ge=1)  # feed-forward width in every layer
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    beam_size: int = Field(default=1, ge=1, le=32)  # evaluation and serving: 1 greedy, more: beam search
    vocab_size: int | None = Field(default=None, ge=2)  # source vocabulary (from the data)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of heads ({self.heads})")
        return self


# ---------------------------------------------------------------- gan (models/gan.py, models/stylegan.py)

class GANOptions(Options):
    latent_dim: int = Field(default=64, ge=1, le=4096)  # size of the noise vector z ~ N(0, I)
    lr_g: float | None = Field(default=None, gt=0.0, le=1.0)  # generator's Adam lr; None: the shared train.lr
    lr_d: float | None = Field(default=None, gt=0.0, le=1.0)  # discriminator's Adam lr; None: the shared train.lr
    betas: tuple[float, float] = (0.5, 0.999)  # Adam's; beta1 0.5 damps the oscillation (DCGAN paper)
    n_critic: int = Field(default=1, ge=1, le=100)  # discriminator steps per generator step
    feature_matching: bool = False  # G matches D's mean penultimate features instead of fooling D (Salimans 2016)


class BCEOptions(GANOptions):
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)  # one-sided: D's real target is 1 - s (Salimans 2016)


class GANMLPOptions(BCEOptions):
    hidden: list[int] = Field(default=[256, 256], min_length=1)  # G's hidden widths; D uses them in reverse
    activation: Literal["relu", "leaky_relu"] = "relu"  # G's hidden activation (D: LeakyReLU(0.2) always)
    batch_norm: bool = False  # BatchNorm1d in G's hidden layers (helps images, can hurt tiny 2-D data)


class DCGANOptions(BCEOptions):
    channels: int = Field(default=64, ge=1)  # conv width at full resolution; doubled at each halving
    hidden: list[int] = Field(default=[256, 256], min_length=1)  # dense widths when the data are points


class WGANGPOptions(GANOptions):
    channels: int = Field(default=64, ge=1)  # conv width at full resolution; doubled at each halving
    hidden: list[int] = Field(default=[256, 256], min_length=1)  # dense widths when the data are points
    betas: tuple[float, float] = (0.0, 0.9)  # Gulrajani et al.: no momentum, the critic's target moves every step
    n_critic: int = Field(default=5, ge=1, le=100)  # critic steps per generator step: the critic must stay near optimal
    # lambda of the gradient penalty E[(|grad D(x^)| - 1)^2]; 10 for images (the paper), 0.1 on 2-D mixtures such
    # as ring8 (the paper's toy code: at 10 the critic stays too smooth to separate modes 0.02 wide)
    gp_weight: float = Field(default=10.0, ge=0.0)
    critic_norm: Literal["layer", "none"] = "layer"  # no batch norm: the penalty is per example (paper's advice)


class StyleGANOptions(BCEOptions):
    latent_dim: int = Field(default=64, ge=1, le=4096)  # z ~ N(0, I)
    w_dim: int = Field(default=64, ge=1, le=4096)  # the intermediate latent w: the styles are affine maps of it
    mapping_layers: int = Field(default=4, ge=1, le=8)  # depth of the mapping MLP (8 in the paper, at 512 wide)
    mapping_lr_mult: float = Field(default=0.01, gt=0.0, le=1.0)  # the mapping's lr = G's lr x this (the paper's)
    channels: int = Field(default=16, ge=1)  # conv width at full resolution; doubled at each halving (G and D)
    mixing_prob: float = Field(default=0.9, ge=0.0, le=1.0)  # share of training batches whose styles mix two ws
    noise: bool = True  # per-layer noise inputs (stochastic detail); off: the image is a function of w alone
    w_avg_beta: float = Field(default=0.995, ge=0.0, lt=1.0)  # EMA decay of w_avg, the truncation trick's centre
    mbstd: bool = True  # D's minibatch standard deviation feature: sees a batch's lack of variety
    r1_gamma: float = Field(default=1.0, ge=0.0)  # R1 weight: gamma / 2 E[|grad D(x)|^2] on reals (paper: 10 at 1024^2)
    r1_every: int = Field(default=16, ge=1, le=1000)  # lazy R1 (StyleGAN2): every k-th D step, weighted x k; 1: each
    # samples come from an exponential moving average of G's weights (Karras et al. 2018; StyleGAN2's ema_kimg 10):
    # its half-life in training images, at most ema_rampup x the images seen so far; 0: the trained G itself
    ema_images: int = Field(default=10_000, ge=0)
    ema_rampup: float = Field(default=0.05, gt=0.0, le=1.0)
    betas: tuple[float, float] = (0.0, 0.99)  # Adam's, as in the paper


# ---------------------------------------------------------------- gan: image-to-image (models/image2image.py)

class ImageGANOptions(Options):
    channels: int = Field(default=32, ge=4, le=512)  # generator width at full resolution (ngf)
    d_channels: int = Field(default=32, ge=4, le=512)  # discriminator width at its first layer (ndf)
    d_layers: int = Field(default=2, ge=1, le=5)  # stride-2 layers of the PatchGAN: patch of 10 (1), 16 (2), 34 (3) px
    lr_g: float | None = Field(default=None, gt=0.0, le=1.0)  # generator lr; None: the shared train.lr
    lr_d: float | None = Field(default=None, gt=0.0, le=1.0)  # discriminator lr; None: the shared train.lr
    betas: tuple[float, float] = (0.5, 0.999)  # Adam's, as in both papers


class Pix2PixOptions(ImageGANOptions):
    depth: int = Field(default=4, ge=1, le=8)  # U-Net halvings: 32x32 -> 2x2 at 4 (the paper: 256 -> 1 at 8)
    dropout: float = Field(default=0.5, ge=0.0, lt=1.0)  # in the first decoder layers: the paper's only noise
    test_dropout: bool = True  # that noise kept when translating (evaluation, serving), as the paper does
    lambda_l1: float = Field(default=100.0, ge=0.0)  # weight of |G(a) - b|_1 beside the adversarial loss (paper: 100)
    adversarial: bool = True  # false: the L1-only U-Net of the paper's ablation (no discriminator step)


class CycleGANOptions(ImageGANOptions):
    blocks: int = Field(default=3, ge=0, le=12)  # residual blocks at 1/4 resolution (paper: 6 at 128 px, 9 at 256)
    lambda_cycle: float = Field(default=10.0, ge=0.0)  # weight of |F(G(a)) - a|_1 + |G(F(b)) - b|_1 (paper: 10)
    lambda_identity: float = Field(default=0.5, ge=0.0)  # |G(b) - b|_1, as a fraction of lambda_cycle (paper: 0.5)
    pool_size: int = Field(default=50, ge=0, le=1000)  # past fakes shown to the discriminators (0: only the newest)
    # CyCADA's semantic consistency (Hoffman et al. 2018): a classifier trained on domain A's labelled training
    # images, frozen, must read in G(a) what it reads in a, and in F(b) what it reads in b; its weight (0: off)
    lambda_semantic: float = Field(default=0.0, ge=0.0)
    # which translations the semantic loss reads: both (CyCADA: G(a) and F(b)) or only G(a), A's own images
    # translated (the classifier reads its own domain well, the other one poorly: its reading of b is noise)
    semantic_sides: Literal["both", "a"] = "both"
    # the classifier trained on batches varied as another hand would draw them (narrower, slanted, thinner,
    # sharper: tasks/augment.py HandwritingAugment), so it reads the class, not domain A's way of drawing it
    semantic_augment: bool = False
    # class-conditional discriminators (projection, Miyato & Koyama 2018): D_B judges G(a) as "an image of domain
    # B of a's class", against real B images of that class. Uses BOTH domains' training labels: no longer the
    # unsupervised setting of the paper (off by default)
    conditional: bool = False


# ---------------------------------------------------------------- speech (models/speech.py)

class CTCOptions(Options):
    cell: Literal["gru", "lstm"] = "gru"
    hidden: int = Field(default=128, ge=8)  # units of each direction of each recurrent layer
    layers: int = Field(default=2, ge=1, le=6)
    bidirectional: bool = True  # every frame also hears what follows it (offline recognition)
    channels: int = Field(default=128, ge=8)  # of the convolutional front end
    # conv1d: mel bands as channels, convolved over time; conv2d: 3x3 filters over (time, band), shared across
    # bands (a shifted formant pattern meets the same filter: unheard voices), then projected to `channels`
    front: Literal["conv1d", "conv2d"] = "conv1d"
    subsample: Literal[1, 2, 4] = 2  # frames per output step: 2 -> 20 ms steps, still several per character
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    beam_size: int = Field(default=1, ge=1, le=64)  # evaluation and serving: 1 greedy, more: CTC prefix beam search
    # evaluation and serving spell only the words of the training transcripts (CTC beam search, 8 wide at least);
    # auto: when they hold at most 100 distinct words (a closed vocabulary: digits, commands), else greedy/beam
    lexicon: Literal["auto", "on", "off"] = "auto"


class ConformerOptions(Options):
    d_model: int = Field(default=96, ge=8)
    heads: int = Field(default=4, ge=1)  # must divide d_model
    layers: int = Field(default=4, ge=1, le=16)
    kernel_size: int = Field(default=15, ge=3, le=63)  # the depthwise convolution's reach, in output steps (odd)
    ff_mult: int = Field(default=4, ge=1, le=8)  # feed-forward width = ff_mult * d_model
    channels: int = Field(default=128, ge=8)
    subsample: Literal[1, 2, 4] = 2
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    beam_size: int = Field(default=1, ge=1, le=64)
    lexicon: Literal["auto", "on", "off"] = "auto"  # as ctc_asr's


# ---------------------------------------------------------------- transfer (models/transfer.py)

class TransferOptions(Options):
    base: str | None = None  # models:/<name>@<alias> | models:/<name>/<version> | runs:/<id>/model | run id | torchvision:<arch>
    base_arch: str = "simple_cnn"  # the untrained base used when `base` is null (from-scratch reference) ...
    base_options: dict = Field(default_factory=dict)  # ... with these options
    trainable: bool = False  # train the whole base too (false: frozen feature extractor, the classic setting)
    fine_tune_blocks: int = Field(default=0, ge=0)  # unfreeze this many of the base's last blocks ...
    fine_tune_after: int = Field(default=0, ge=0)  # ... after this many head-only epochs ...
    fine_tune_lr: float = Field(default=0.1, gt=0.0, le=1.0)  # ... at this fraction of train.lr
    hidden: int = Field(default=0, ge=0)  # width of a hidden dense layer in the new head (0: linear head)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # before the head's last layer
    download: bool = False  # torchvision bases: allow downloading pretrained weights into the torch cache
    # the checkpoint of a `base` this pipeline trained, already fetched by the caller (tasks.stages.build resolves
    # models:/... through the tracking module): its self-describing dict, or the path of its model.pt
    base_checkpoint: dict | str | None = Field(default=None, exclude=True, repr=False)

    @field_validator("base")
    @classmethod
    def _reference(cls, v: str | None):
        if v is None or re.fullmatch(r"models:/[^@/]+(@[\w.-]+|/\d+)|runs:/[0-9a-f]{32}/\S+|[0-9a-f]{32}|torchvision:\w+", v):
            return v
        raise ValueError(f"{v!r} is not a model reference: use models:/<name>@<alias>, models:/<name>/<version>, "
                         "runs:/<run id>/model, a run id or torchvision:<arch>")



# ---------------------------------------------------------------- the catalogue

@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    module: str  # the family module whose @register_model builds it
    options: type[Options]
    description: str  # one line, as `nnlab models` lists it
    kind: str | None = None  # the kind of run it makes whatever the data (GANs: "generation"); None: the data's

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r} is not one of {', '.join(FAMILIES)}")


MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("mlp", "mlp", "models.mlp", MLPOptions, "Multi-layer perceptron on flattened inputs."),
    ModelSpec("simple_cnn", "cnn", "models.cnn", SimpleCNNOptions,
              "The classic small CNN: three convolutions with pooling, then two dense layers."),
    ModelSpec("vgg", "cnn", "models.cnn", VGGOptions,
              "VGG: stages of stacked 3x3 convolutions, halved by pooling, global average pooling head."),
    ModelSpec("resnet", "cnn", "models.cnn", ResNetOptions,
              "CIFAR-style ResNet (6n+2 layers of basic residual blocks); skip=false gives the plain twin."),
    ModelSpec("inception", "cnn", "models.cnn", InceptionOptions,
              "GoogLeNet-style: blocks of parallel 1x1/3x3/5x5/pool branches, pooling between stages, GAP head."),
    ModelSpec("mobilenet", "cnn", "models.cnn", MobileNetOptions,
              "MobileNetV2-style: inverted residuals of depthwise-separable convs, width multiplier, GAP head."),
    ModelSpec("rnn", "rnn", "models.sequence", RecurrentOptions,
              "Elman RNN (tanh) over time steps: image rows, sequence windows or embedded tokens."),
    ModelSpec("lstm", "rnn", "models.sequence", RecurrentOptions,
              "LSTM over time steps: image rows, sequence windows or embedded tokens."),
    ModelSpec("gru", "rnn", "models.sequence", RecurrentOptions,
              "GRU over time steps: image rows, sequence windows or embedded tokens."),
    ModelSpec("attention", "rnn", "models.sequence", AttentionOptions,
              "LSTM/GRU encoder with additive or dot attention pooling over time steps (weights kept for plots)."),
    ModelSpec("transformer", "transformer", "models.sequence", TransformerOptions,
              "Transformer encoder (sinusoidal positions, masked mean or [CLS] pooling) over time steps or tokens."),
    ModelSpec("word_lm", "rnn", "models.sequence", WordLMOptions,
              "Word-level language model: stacked LSTM/GRU predicting the next word at every position (tied option).",
              kind="word_language_model"),
    ModelSpec("seq2seq", "seq2seq", "models.seq2seq", Seq2SeqOptions,
              "RNN encoder-decoder (GRU/LSTM, bidirectional encoder) with additive, dot or no attention.",
              kind="translation"),
    ModelSpec("transformer_seq2seq", "seq2seq", "models.seq2seq", TransformerSeq2SeqOptions,
              "nn.Transformer encoder-decoder with sinusoidal positions, padding and causal masks.", kind="translation"),
    ModelSpec("gan_mlp", "gan", "models.gan", GANMLPOptions,
              "Textbook GAN: dense generator and LeakyReLU discriminator, non-saturating BCE loss.", kind="generation"),
    ModelSpec("dcgan", "gan", "models.gan", DCGANOptions,
              "DCGAN: transposed-conv generator with batch norm, strided-conv LeakyReLU discriminator (dense on points).",
              kind="generation"),
    ModelSpec("wgan_gp", "gan", "models.gan", WGANGPOptions,
              "WGAN-GP: DCGAN-shaped networks, a critic without sigmoid or batch norm, trained with a gradient penalty.",
              kind="generation"),
    ModelSpec("stylegan", "gan", "models.stylegan", StyleGANOptions,
              "StyleGAN: mapping network, learned constant, AdaIN and noise at every layer, style mixing; logistic + R1.",
              kind="style_generation"),
    ModelSpec("pix2pix", "gan", "models.image2image", Pix2PixOptions,
              "Pix2Pix: a U-Net generator with skips and a conditional PatchGAN, trained on adversarial + lambda L1.",
              kind="image_translation"),
    ModelSpec("cyclegan", "gan", "models.image2image", CycleGANOptions,
              "CycleGAN: two ResNet generators and two PatchGANs, least-squares GAN loss + cycle and identity L1.",
              kind="image_translation"),
    ModelSpec("ctc_asr", "speech", "models.speech", CTCOptions,
              "Speech to characters: conv front end + bidirectional GRU/LSTM, trained with CTC.",
              kind="speech_recognition"),
    ModelSpec("conformer", "speech", "models.speech", ConformerOptions,
              "Speech to characters: conv front end + Conformer blocks (attention and convolution), trained with CTC.",
              kind="speech_recognition"),
    ModelSpec("transfer", "transfer", "models.transfer", TransferOptions,
              "A frozen base (MLflow model, torchvision weights or untrained) with a new head; optional fine-tuning."),
)}


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint} known models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def list_models() -> list[str]:
    return sorted(MODELS)
