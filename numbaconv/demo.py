"""A small CNN trained on scikit-learn's handwritten digits, with :class:`numbaconv.ConvLayer`.

The network (what ``numbaconv demo`` trains)::

    x (N, 1, 8, 8) -> ConvLayer 3x3, pad 1, ReLU (N, F, 8, 8) -> 2x2 max-pool (N, F, 4, 4)
      -> dense + ReLU (N, hidden) -> dense (N, 10) -> softmax cross-entropy

trained with SGD (momentum 0.9, learning rate decaying linearly to 0) on mini-batches of a
seeded, stratified train/test split of ``sklearn.datasets.load_digits`` (1797 8x8 images, pixels
scaled to [0, 1]).

The pooling and dense layers are deliberately minimal and live here, not in numbaconv's API.
scikit-learn, tqdm and matplotlib are imported inside the functions that need them, so
``import numbaconv`` (and ``import numbaconv.demo``) never requires them.

Everything random comes from one ``np.random.Generator`` seeded with ``seed``, and every kernel is
deterministic, so the same seed and kernel give the same numbers, run after run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .layer import ConvLayer

#: The packages the demo needs (``pip install "numbaconv[demo]"``): import name -> package name.
DEMO_PACKAGES = {"sklearn": "scikit-learn", "tqdm": "tqdm", "matplotlib": "matplotlib"}

# Defaults, tuned for a robust test accuracy after 5 epochs (seeds 0-59: worst 0.964, mean 0.98).
# Tried and dropped: AdaGrad (the teaching layer's update, accumulators started at 1e-8, 1e-2 or
# 0.1): for a few seeds in 30 it ended below 0.95, because weights with tiny gradients so far take
# sign-sized steps late in training; constant-rate SGD (with or without momentum) also left a
# few seeds below 0.95. The linear decay to 0 is what removed the late swings. Batches of 32 lose
# about half a point; 8 filters are too few; 32 filters or 128 hidden units did not help.
N_FILTERS = 16
HIDDEN = 64
LEARNING_RATE = 0.05
BATCH_SIZE = 16
EPOCHS = 5
TEST_FRACTION = 0.2
DTYPE = np.float32


def missing_packages(with_plot: bool = False) -> list[str]:
    """The demo's optional dependencies that cannot be imported.

    Parameters
    ----------
    with_plot : bool
        Also require matplotlib (only ``--plot`` needs it).

    Returns
    -------
    list of str
        Package names (as ``pip`` knows them) that are missing; empty when all are there.
    """
    missing = []
    for module, package in DEMO_PACKAGES.items():
        if module == "matplotlib" and not with_plot:
            continue
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    return missing


def load_digits_split(seed: int, limit: int | None = None):
    """The digits data set as a seeded, stratified train/test split.

    Parameters
    ----------
    seed : int
        Seed of the split.
    limit : int, optional
        Keep only the first ``limit`` training images (the test set is unchanged).

    Returns
    -------
    x_train, y_train, x_test, y_test : ndarray
        Images of shape (n, 1, 8, 8) in ``DTYPE`` with pixels in [0, 1]; integer labels 0-9.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixels are integers 0-16 in the bundled data set.
    images = (digits.images / 16.0).astype(DTYPE)[:, None, :, :]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=TEST_FRACTION, random_state=seed, stratify=digits.target
    )
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]
    return x_train, y_train, x_test, y_test


class MaxPool2x2:
    """2x2 max-pooling with stride 2 over (N, C, H, W) arrays with even H and W."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Pool ``x`` to (N, C, H // 2, W // 2) and remember where each maximum came from."""
        n, c, h, w = x.shape
        windows = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5)
        windows = windows.reshape(n, c, h // 2, w // 2, 4)
        self.argmax = windows.argmax(axis=-1)
        self.x_shape = x.shape
        return np.take_along_axis(windows, self.argmax[..., None], axis=-1)[..., 0]

    def backward(self, grad_y: np.ndarray) -> np.ndarray:
        """Route ``grad_y`` to the position of each window's maximum (first one on ties)."""
        n, c, h, w = self.x_shape
        grad_windows = np.zeros((n, c, h // 2, w // 2, 4), dtype=grad_y.dtype)
        np.put_along_axis(grad_windows, self.argmax[..., None], grad_y[..., None], axis=-1)
        grad_x = grad_windows.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5)
        return grad_x.reshape(n, c, h, w)


class Dense:
    """A fully connected layer ``y = x @ w + b``, optionally followed by a ReLU.

    Parameters
    ----------
    n_in, n_out : int
        Input and output features.
    rng : numpy.random.Generator
        Source of the He-initialised weights.
    relu : bool
        Apply a ReLU to the output.
    """

    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator, relu: bool):
        self.w = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(DTYPE)
        self.b = np.zeros(n_out, dtype=DTYPE)
        self.relu = relu

    def forward(self, x: np.ndarray) -> np.ndarray:
        """``x`` (N, n_in) -> (N, n_out)."""
        self.x = x
        y = x @ self.w + self.b
        if self.relu:
            y = np.maximum(y, 0)
        self.y = y
        return y

    def backward(self, grad_y: np.ndarray) -> np.ndarray:
        """Store ``grad_w`` and ``grad_b``; return the gradient with respect to the input."""
        if self.relu:
            grad_y = grad_y * (self.y > 0)
        self.grad_w = self.x.T @ grad_y
        self.grad_b = grad_y.sum(axis=0)
        return grad_y @ self.w.T


class SGD:
    """Stochastic gradient descent with momentum: ``v = momentum * v - eta * grad; param += v``.

    Parameters
    ----------
    eta : float
        Learning rate; :func:`train` lowers it linearly to 0 over the run.
    momentum : float
    """

    def __init__(self, eta: float, momentum: float = 0.9):
        self.eta = eta
        self.momentum = momentum
        self.velocities: dict[int, np.ndarray] = {}

    def step(self, param: np.ndarray, grad: np.ndarray) -> None:
        """Update ``param`` in place from ``grad`` (reshaped to ``param``'s shape)."""
        velocity = self.velocities.setdefault(id(param), np.zeros_like(param))
        velocity *= self.momentum
        velocity -= self.eta * grad.reshape(param.shape)
        param += velocity


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of the softmax of ``logits`` and its gradient.

    Parameters
    ----------
    logits : ndarray, shape (N, classes)
    labels : ndarray of int, shape (N,)

    Returns
    -------
    loss : float
        Mean over the batch.
    grad_logits : ndarray, shape (N, classes)
    """
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    loss = -float(log_probs[rows, labels].mean())
    grad = np.exp(log_probs)
    grad[rows, labels] -= 1
    return loss, grad / len(labels)


class SmallCNN:
    """conv 3x3 + ReLU -> 2x2 max-pool -> dense + ReLU -> dense, on (N, 1, 8, 8) images.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of all initial weights.
    kernel : str, optional
        The numbaconv kernel of the convolution (None: the default kernel).
    n_filters, hidden : int
        Convolution filters and hidden units.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        kernel: str | None = None,
        n_filters: int = N_FILTERS,
        hidden: int = HIDDEN,
    ):
        # He initialisation: std sqrt(2 / fan_in) with fan_in = 1 channel * 3 * 3.
        self.conv = ConvLayer(
            1, 8, 8, n_filters, 3, 3, 1, 1, kernel=kernel, dtype=DTYPE, wb_width=0.47, rng=rng
        )
        self.pool = MaxPool2x2()
        self.hidden = Dense(n_filters * 4 * 4, hidden, rng, relu=True)
        self.out = Dense(hidden, 10, rng, relu=False)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, 10) of images ``x`` (N, 1, 8, 8)."""
        pooled = self.pool.forward(self.conv.forward(x))
        self.pooled_shape = pooled.shape
        return self.out.forward(self.hidden.forward(pooled.reshape(len(x), -1)))

    def backward(self, grad_logits: np.ndarray) -> None:
        """Back-propagate the gradient of the loss with respect to the logits."""
        grad = self.hidden.backward(self.out.backward(grad_logits))
        grad = self.pool.backward(grad.reshape(self.pooled_shape))
        self.conv.backward(grad)

    def update(self, optimizer: SGD) -> None:
        """One optimizer step on every layer's weights and biases (updated in place)."""
        for layer in (self.conv, self.hidden, self.out):
            optimizer.step(layer.w, layer.grad_w)
            optimizer.step(layer.b, layer.grad_b)

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Predicted labels of images ``x``, computed ``batch_size`` images at a time."""
        chunks = [self.forward(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return np.concatenate(chunks).argmax(axis=1)


@dataclass(frozen=True)
class EpochStats:
    """What one epoch of :func:`train` reports."""

    epoch: int
    loss: float  #: mean training loss over the epoch's mini-batches
    train_accuracy: float  #: accuracy on the whole training set after the epoch
    test_accuracy: float
    seconds: float  #: wall time of the epoch (training and evaluation)


def train(
    kernel: str | None = None,
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    seed: int = 0,
    learning_rate: float = LEARNING_RATE,
    limit: int | None = None,
    progress: bool = True,
) -> Iterator[EpochStats]:
    """Train :class:`SmallCNN` on the digits, yielding the statistics of each epoch.

    Parameters
    ----------
    kernel : str, optional
        The numbaconv kernel of the convolution (None: the default kernel).
    epochs, batch_size : int
    seed : int
        Seeds the train/test split, the initial weights and the shuffling.
    learning_rate : float
        Initial learning rate of SGD (momentum 0.9); it decays linearly to 0 over the run.
    limit : int, optional
        Train on the first ``limit`` training images only (for quick checks).
    progress : bool
        Show a tqdm progress bar (on stderr) during each epoch.

    Yields
    ------
    EpochStats
        One per epoch, as soon as the epoch is done.
    """
    from tqdm.auto import tqdm

    x_train, y_train, x_test, y_test = load_digits_split(seed, limit)
    rng = np.random.default_rng(seed)
    model = SmallCNN(rng, kernel=kernel)
    optimizer = SGD(learning_rate)
    n_batches = -(-len(x_train) // batch_size)
    step, total_steps = 0, n_batches * epochs
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        order = rng.permutation(len(x_train))
        losses = []
        bar = tqdm(
            total=n_batches, desc=f"epoch {epoch}/{epochs}", leave=False, disable=not progress
        )
        with bar:
            for first in range(0, len(x_train), batch_size):
                batch = order[first : first + batch_size]
                loss, grad = softmax_cross_entropy(model.forward(x_train[batch]), y_train[batch])
                model.backward(grad)
                optimizer.eta = learning_rate * (1 - step / total_steps)
                model.update(optimizer)
                step += 1
                losses.append(loss)
                bar.update()
        train_accuracy = float(np.mean(model.predict(x_train) == y_train))
        test_accuracy = float(np.mean(model.predict(x_test) == y_test))
        yield EpochStats(
            epoch,
            float(np.mean(losses)),
            train_accuracy,
            test_accuracy,
            time.perf_counter() - start,
        )


def plot_curves(history: list[EpochStats], path: str, title: str = "") -> None:
    """Write a PNG of the learning curves (loss; train and test accuracy) to ``path``.

    Parameters
    ----------
    history : list of EpochStats
    path : str
        Output file; written as PNG whatever its extension.
    title : str
        Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [s.epoch for s in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(8, 3.2), constrained_layout=True)
    ax_loss.plot(epochs, [s.loss for s in history], "o-", color="tab:red")
    ax_loss.set(xlabel="epoch", ylabel="training loss (cross-entropy)")
    ax_acc.plot(epochs, [s.train_accuracy for s in history], "o-", label="train")
    ax_acc.plot(epochs, [s.test_accuracy for s in history], "s-", label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy")
    ax_acc.legend(loc="lower right")
    for ax in (ax_loss, ax_acc):
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)
