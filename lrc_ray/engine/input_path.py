"""Pre-training's input path: compact slices (`data.shard`) -> two-view batches on the training device.

Two modes (`pretrain.input_mode`), one batch maker:
- `device`: the selected slices are read once and kept on the training device in their compact
  types (uint8 image, int16 region ids, uint8 labels: about 4 bytes a pixel). Every
  data-parallel rank holds them all and, as PyTorch's DistributedSampler does, takes its part
  of each global batch of an epoch's permutation: ranks always run the same number of steps,
  and W ranks with batch B draw exactly what one worker with batch W*B draws. A step then
  gathers its slices, augments them and samples them without leaving the device.
- `stream`: each rank reads its own split of the slices every epoch (Ray Data map tasks decode
  them on the node's spare CPUs), in windows of `STREAM_WINDOW_ROWS` rows that it permutes
  and cuts into batches; each batch is copied to the device from pinned memory. A reader
  thread keeps the next windows ready and goes on into the next epoch while this one's last
  steps run, so the reads overlap the model's steps. A window that holds the whole data set
  gives exactly the device mode's batches.
- `auto`: device when the slices take at most `DEVICE_MEMORY_SHARE` of the device's free
  memory (the rest is for the model), else stream.
A slice's augmentation and its sampled pixels are keyed by (seed, epoch, the slice's row key),
so they are the same in both modes, in any batch, on any rank.
"""

from __future__ import annotations

import logging
import queue
import threading
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from lrc_ray.augment.two_views import TwoViewAugment
from lrc_ray.data.shard import compact_bytes
from lrc_ray.errors import UserInputError
from lrc_ray.keyed_random import mix64

logger = logging.getLogger(__name__)

# The device holds the slices when they take at most this share of its free memory: a 256 px
# step of full.yaml's network at batch 64 needs about 20 GB of activations besides.
DEVICE_MEMORY_SHARE = 0.5
STREAM_WINDOW_ROWS = 1024  # rows a streaming rank permutes at once: 256 MB of 256 px slices
# Windows a streaming rank's reader thread keeps ready (each pinned where there is a GPU). With
# Ray Data's own prefetch of 2, the window being permuted (and its copy) and the one in use, a
# rank holds up to 7 windows: 1.8 GB of host memory at 256 px.
READ_AHEAD_WINDOWS = 2
READER_CLOSE_SECONDS = 10.0


def choose_input_mode(requested: str, *, num_slices: int, size: int, free_bytes: int) -> str:
    """`device` or `stream`, as `requested` ("auto" decides by the bytes the slices need).

    Raises:
        UserInputError: "device" was asked for and the slices do not fit (bytes needed and free).
    """
    needed = compact_bytes(num_slices, size)
    fits = needed <= DEVICE_MEMORY_SHARE * free_bytes
    if requested == "device" and not fits:
        raise UserInputError(
            f"pretrain.input_mode: device needs {needed} bytes for {num_slices} slices of {size} x {size}, but only "
            f"{free_bytes} bytes are free on the device ({DEVICE_MEMORY_SHARE:.0%} of them may hold data); "
            "use input_mode: stream or auto"
        )
    mode = requested if requested != "auto" else ("device" if fits else "stream")
    logger.info("input mode %s (%s): %d slices need %.1f MB, %.1f MB free on the device", mode, requested,
                num_slices, needed / 2**20, free_bytes / 2**20)
    return mode


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device, or the host's available memory for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as meminfo:
        available_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:"))
    return available_kb * 1024


def epoch_permutation(num_rows: int, seed: int, epoch: int, part: int = 0) -> np.ndarray:
    """The order in which an epoch visits `num_rows` rows (of part `part`: a stream window)."""
    return np.random.default_rng([seed, epoch, part]).permutation(num_rows)


def slice_seeds(seed: int, epoch: int, row_keys: np.ndarray) -> np.ndarray:
    """One int64 seed per slice and epoch, keyed by the slice itself: the seed of its augmentation
    draws and of the pixels the loss samples."""
    run = mix64(torch.tensor([seed * 1_000_003 + epoch], dtype=torch.int64))
    return mix64(torch.from_numpy(np.asarray(row_keys, dtype=np.int64)) ^ run).numpy()


class TwoViewBatches:
    """Slices already on the device -> a pre-training batch: two views, each slice's draws its own.

    Args:
        augment: the two-view augmentation; None gives each slice itself as both views (for
            measuring the input path without augmentation).
        seed: the run's seed.
        with_labels: also return the views' labels (the supervised methods).
    """

    def __init__(self, augment: TwoViewAugment | None, *, seed: int, with_labels: bool) -> None:
        self.augment = augment
        self.seed = seed
        self.with_labels = with_labels

    def make(self, slices: dict[str, Tensor], row_keys: np.ndarray, n_regions: np.ndarray, epoch: int) -> dict:
        """A batch of image1, image2 (B, 1, S, S) float32; regions1, regions2 (B, S, S) int32;
        label1, label2 (B, S, S) int32 with labels; sample_seeds (B,) int64 on the device; and
        region_ids_below, an int above every region id (spares the loss a read of the maps' maximum).

        Shape: slices holds image uint8, regions int, label uint8, each (B, S, S), on the device.
        """
        seeds = slice_seeds(self.seed, epoch, row_keys)
        device = slices["image"].device
        labels = slices["label"] if self.with_labels else None
        if self.augment is None:
            image = (slices["image"].float() / 255.0).unsqueeze(1)
            regions = slices["regions"].to(torch.int32)
            batch = {"image1": image, "image2": image, "regions1": regions, "regions2": regions}
            if labels is not None:
                batch |= {"label1": labels.to(torch.int32), "label2": labels.to(torch.int32)}
        else:
            shape = tuple(slices["image"].shape[1:])
            draws = [self.augment.draw(shape, np.random.default_rng(int(slice_seed) & (2**63 - 1)),
                                       with_label=self.with_labels) for slice_seed in seeds]
            batch = self.augment.augment_batch(slices["image"], slices["regions"], draws, labels=labels)
        batch["sample_seeds"] = torch.from_numpy(seeds).to(device, non_blocking=True)
        batch["region_ids_below"] = int(n_regions.max()) if len(n_regions) else 0
        return batch


class DeviceResidentSlices:
    """All selected slices on the device; each rank takes its part of every global batch.

    Args:
        arrays: compact arrays (`data.shard.compact_slices`), sorted by row key.
        device: where the slices live and batches are made.
        batch_size: per rank; world_size, rank: the data-parallel group.
    """

    mode = "device"

    def __init__(self, arrays: dict[str, np.ndarray], device: torch.device, *, batch_size: int, world_size: int = 1,
                 rank: int = 0, with_labels: bool = False) -> None:
        names = ("image", "regions") + (("label",) if with_labels else ())
        self.slices = {name: _on_device(arrays[name], device) for name in names}
        self.row_keys, self.n_regions = arrays["row_key"], arrays["n_regions"]
        self.device, self.batch_size, self.world_size, self.rank = device, batch_size, world_size, rank

    @property
    def steps_per_epoch(self) -> int:
        return len(self.row_keys) // (self.batch_size * self.world_size)

    def batches(self, maker: TwoViewBatches, epoch: int) -> Iterator[dict]:
        order = epoch_permutation(len(self.row_keys), maker.seed, epoch)
        global_batch = self.batch_size * self.world_size
        for step in range(self.steps_per_epoch):
            start = step * global_batch + self.rank * self.batch_size
            rows = order[start : start + self.batch_size]
            index = torch.from_numpy(rows).to(self.device, non_blocking=True)
            slices = {name: values.index_select(0, index) for name, values in self.slices.items()}
            yield maker.make(slices, self.row_keys[rows], self.n_regions[rows], epoch)

    def close(self) -> None:
        """Nothing to stop (the stream mode has a reader thread)."""


class StreamedSlices:
    """This rank's split of the slices, read anew every epoch, permuted window by window.

    Args:
        windows: epoch -> iterator of compact-array batches of up to `STREAM_WINDOW_ROWS` rows
            (a Ray Data iterator in a Train worker, slices of a table in process).
        device: where batches are made.
        steps_per_epoch: batches every rank makes an epoch (its rows // batch size, equal on all
            ranks since Ray Data splits rows equally); a split that runs short is an error, not
            a hang in the next collective.
        epochs: the run's epochs: the reader reads ahead into the next epoch up to the last one.
    """

    mode = "stream"

    def __init__(self, windows: Callable[[int], Iterator[dict[str, np.ndarray]]], device: torch.device, *,
                 batch_size: int, steps_per_epoch: int, epochs: int = 1, world_size: int = 1, rank: int = 0,
                 with_labels: bool = False) -> None:
        self.windows, self.device, self.batch_size, self.epochs = windows, device, batch_size, epochs
        self.steps_per_epoch, self.world_size, self.rank = steps_per_epoch, world_size, rank
        self.names = ("image", "regions") + (("label",) if with_labels else ())
        self._reader: WindowReader | None = None
        self._read_for: tuple[int, int] | None = None  # (seed, epoch) the reader was last asked for

    def batches(self, maker: TwoViewBatches, epoch: int) -> Iterator[dict]:
        made = 0
        for rows in self._ready_windows(maker.seed, epoch):
            for start in range(0, len(rows["row_key"]) - self.batch_size + 1, self.batch_size):
                if made == self.steps_per_epoch:
                    return
                slices = {name: rows[name][start : start + self.batch_size].to(self.device, non_blocking=True)
                          for name in self.names}
                end = start + self.batch_size
                yield maker.make(slices, rows["row_key"][start:end], rows["n_regions"][start:end], epoch)
                made += 1
        if made < self.steps_per_epoch:
            raise RuntimeError(f"rank {self.rank}'s split of the slices gave {made} batches in epoch {epoch}, "
                               f"expected {self.steps_per_epoch}")

    def close(self) -> None:
        """Stop the reader thread (it stops by itself after the last epoch)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _ready_windows(self, seed: int, epoch: int) -> Iterator[dict]:
        """Epoch `epoch`'s permuted windows from the reader, which read them ahead when this epoch
        follows the last one asked for; any other epoch (a first, a repeat) starts a new reader."""
        if self._reader is None or self._read_for != (seed, epoch - 1) or epoch >= self._reader.last:
            self.close()
            self._reader = WindowReader(lambda read_epoch: self._permuted_rows(seed, read_epoch),
                                        first=epoch, last=max(epoch + 1, self.epochs), depth=READ_AHEAD_WINDOWS)
        self._read_for = (seed, epoch)
        return self._reader.windows(epoch)

    def _permuted_rows(self, seed: int, epoch: int) -> Iterator[dict]:
        """Windows sorted by row key and permuted, the image arrays as (pinned) tensors; the rows
        left over after the last whole batch of a window lead the next one."""
        carry: dict[str, np.ndarray] | None = None
        for index, window in enumerate(self.windows(epoch)):
            if carry is not None:
                window = {name: np.concatenate([carry[name], window[name]]) for name in window}
            order = np.argsort(window["row_key"], kind="stable")
            order = order[epoch_permutation(len(order), seed, epoch, part=index * self.world_size + self.rank)]
            rows = {name: values[order] for name, values in window.items()}
            whole = len(order) // self.batch_size * self.batch_size
            carry = {name: values[whole:] for name, values in rows.items()}
            yield {name: (_pinned(values[:whole]) if name in self.names else values[:whole])
                   for name, values in rows.items()}


class WindowReader:
    """A thread that reads epochs `first` .. `last` - 1 of windows, in order, keeping up to
    `depth` of them ready: Ray Data's start of an epoch and its reads overlap the steps.

    Args:
        read_epoch: epoch -> its windows.
    """

    _END = object()  # an epoch's last item

    def __init__(self, read_epoch: Callable[[int], Iterator[dict]], *, first: int, last: int, depth: int) -> None:
        self.last = last
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(read_epoch, first, last), daemon=True,
                                        name="lrc-ray-stream-reader")
        self._thread.start()

    def windows(self, epoch: int) -> Iterator[dict]:
        """Epoch `epoch`'s windows; what an earlier epoch left unread is skipped. A read's error is raised here."""
        while True:
            item_epoch, item = self._ready.get()
            if isinstance(item, BaseException):
                raise item
            if item_epoch < epoch:
                continue
            if item is self._END:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        # A read waiting on other ranks (a split's next epoch, after a failure) may never end: the
        # thread is a daemon, and is left to the process's end after a while.
        self._thread.join(timeout=READER_CLOSE_SECONDS)
        if self._thread.is_alive():
            logger.warning("the stream's reader thread is still reading; left to stop with the process")

    def _read(self, read_epoch, first: int, last: int) -> None:
        try:
            for epoch in range(first, last):
                for window in read_epoch(epoch):
                    if not self._put((epoch, window)):
                        return
                if not self._put((epoch, self._END)):
                    return
        except BaseException as error:  # the consumer raises it, in its own thread
            self._put((first, error))

    def _put(self, item) -> bool:
        """Queue `item` unless the reader is closed first (then False)."""
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


def _on_device(array: np.ndarray, device: torch.device) -> Tensor:
    """`array` on `device`, without a copy on the CPU. Arrow's read-only buffers are taken as they
    are (nothing writes the slices: a batch gathers copies), without torch's warning about them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array).to(device)


def _pinned(array: np.ndarray) -> Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.pin_memory() if torch.cuda.is_available() else tensor
