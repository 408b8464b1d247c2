r"""The KV caches a step reads: one contiguous tensor, or pages through a page table.

A **contiguous** cache is a ``[B, Hkv, T, D]`` tensor: key ``t`` of request ``b`` is
``k_cache[b, :, t]``, and every request can hold ``T`` keys.

A **paged** cache (:class:`PagedKV`, FlashInfer's layout) keeps the keys, or the values,
in ``P`` pages of ``page_size`` slots and a :class:`PageTable` saying which pages each
request owns, in order:

.. math::

    \text{key } t \text{ of request } b \;=\; \text{pages}\big[\,\text{indices}[\text{indptr}[b]
    + \lfloor t / \text{page\_size} \rfloor]\,\big] \text{ at slot } t \bmod \text{page\_size},

and request ``b`` holds ``(n_b − 1)·page_size + last_page_len[b]`` keys, where
``n_b = indptr[b+1] − indptr[b]`` is its number of pages. Pages are ``[P, page_size, Hkv, D]``
(layout ``"NHD"``) or ``[P, Hkv, page_size, D]`` (``"HND"``); any page size ≥ 1.

Both backends take either kind wherever they take ``k_cache, v_cache`` (a pair of tensors or
a pair of :class:`PagedKV` sharing one table). The reference reads through :func:`read_keys`,
which turns either into the ``[B, Hkv, n, D]`` block of a key range, so its algorithm is
the same code for both; the Triton kernels look each key's page up in the table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("NHD", "HND")


def _int_vector(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {type(x).__name__}")
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must have dtype int32 or int64, got {x.dtype}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(x.shape)}")
    return x


@dataclass(frozen=True, eq=False)
class PageTable:
    """Which pages each of ``B`` requests owns (FlashInfer's ``indptr`` / ``indices`` / ``last_page_len``).

    Attributes:
        indptr: ``[B+1]`` int32/int64, ``indptr[0] = 0``, non-decreasing: request ``b``'s
            pages are ``indices[indptr[b] : indptr[b+1]]``; each request owns at least one.
        indices: ``[nnz]`` int32/int64 page numbers, ``nnz ≥ indptr[B]``.
        last_page_len: ``[B]`` int32/int64 keys in each request's last page, ``≥ 1`` (the
            page size bounds it: :class:`PagedKV` checks that).

    Raises ``TypeError`` / ``ValueError`` naming the field on a malformed table.
    """

    indptr: torch.Tensor
    indices: torch.Tensor
    last_page_len: torch.Tensor

    def __post_init__(self):
        indptr = _int_vector("indptr", self.indptr)
        indices = _int_vector("indices", self.indices)
        last = _int_vector("last_page_len", self.last_page_len)
        if indptr.numel() < 2:
            raise ValueError(f"indptr must have B+1 ≥ 2 entries, got shape {tuple(indptr.shape)}")
        if last.numel() != indptr.numel() - 1:
            raise ValueError(f"last_page_len must have shape [B={indptr.numel() - 1}] (indptr has B+1 entries), got {tuple(last.shape)}")
        if len({indptr.device, indices.device, last.device}) > 1:
            raise ValueError(f"indptr, indices and last_page_len must be on one device, got {indptr.device}, {indices.device}, {last.device}")
        counts = indptr[1:] - indptr[:-1]
        if int(indptr[0]) != 0 or bool((counts < 0).any()):
            raise ValueError(f"indptr must start at 0 and never decrease, got {indptr.tolist()}")
        if bool((counts == 0).any()):
            raise ValueError(f"every request must own at least one page: indptr {indptr.tolist()} gives a request none")
        if int(indptr[-1]) > indices.numel():
            raise ValueError(f"indptr ends at {int(indptr[-1])}, beyond the {indices.numel()} entries of indices")
        if bool((last < 1).any()):
            raise ValueError(f"last_page_len must be ≥ 1 (a request's last page holds a key), got {last.tolist()}")

    @classmethod
    def unchecked(cls, indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor) -> "PageTable":
        """A table built without its checks (no host sync): for a captured CUDA graph or a
        custom op's body, over buffers the caller validated (:class:`PageTable` once) and
        updates in place."""
        table = object.__new__(cls)
        for name, value in (("indptr", indptr), ("indices", indices), ("last_page_len", last_page_len)):
            object.__setattr__(table, name, value)
        return table

    @property
    def batch(self) -> int:
        return self.last_page_len.numel()

    @property
    def device(self) -> torch.device:
        return self.indptr.device

    def pages_per_request(self) -> torch.Tensor:
        """``[B]`` int64 ``n_b``."""
        return (self.indptr[1:] - self.indptr[:-1]).to(torch.int64)

    def lengths(self, page_size: int) -> torch.Tensor:
        """``[B]`` int64 keys each request holds: ``(n_b − 1)·page_size + last_page_len[b]``."""
        return (self.pages_per_request() - 1) * page_size + self.last_page_len.to(torch.int64)

    def same_as(self, other: "PageTable") -> bool:
        return self is other or all(
            a.shape == b.shape and a.device == b.device and torch.equal(a.to(torch.int64), b.to(torch.int64))
            for a, b in ((self.indptr, other.indptr), (self.indices, other.indices), (self.last_page_len, other.last_page_len))
        )


@dataclass(frozen=True, eq=False)
class PagedKV:
    """The keys (or the values) of a batch in pages, read through a :class:`PageTable`.

    Attributes:
        pages: ``[P, page_size, Hkv, D]`` (``"NHD"``) or ``[P, Hkv, page_size, D]`` (``"HND"``),
            floating point. Pages no request owns are never read.
        table: the page table (shared by a cache's keys and values).
        layout: ``"NHD"`` or ``"HND"``.

    ``shape`` is that of the contiguous cache it stands for, ``[B, Hkv, T, D]`` with ``T`` the
    longest request's pages times ``page_size``, so code that asks a cache for its heads or
    head size reads either kind.
    """

    pages: torch.Tensor
    table: PageTable
    layout: str = "NHD"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not isinstance(self.table, PageTable):
            raise TypeError(f"table must be a PageTable, got {type(self.table).__name__}")
        if not isinstance(self.pages, torch.Tensor) or not self.pages.is_floating_point():
            raise TypeError(f"pages must be a floating-point torch.Tensor, got {getattr(self.pages, 'dtype', type(self.pages).__name__)}")
        if self.pages.dim() != 4:
            hint = "[P, page_size, Hkv, D]" if self.layout == "NHD" else "[P, Hkv, page_size, D]"
            raise ValueError(f"pages must have 4 dimensions {hint} (layout {self.layout}), got shape {tuple(self.pages.shape)}")
        if self.pages.device != self.table.device:
            raise ValueError(f"pages ({self.pages.device}) and the page table ({self.table.device}) must be on one device")
        P = self.pages.shape[0]
        used = self.table.indices[: int(self.table.indptr[-1])]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= P):
            raise ValueError(f"indices must lie in [0, {P}) (the pages tensor holds {P} pages), got {int(used.min())} … {int(used.max())}")
        if int(self.table.last_page_len.max()) > self.page_size:
            raise ValueError(f"last_page_len {self.table.last_page_len.tolist()} must not exceed page_size {self.page_size}")
        Hkv = self.pages.shape[2] if self.layout == "NHD" else self.pages.shape[1]
        max_pages = int(self.table.pages_per_request().max())
        # computed once: a launcher reading the shape inside a captured step must not sync
        object.__setattr__(self, "_shape", torch.Size((self.table.batch, Hkv, max_pages * self.page_size, self.pages.shape[3])))

    @classmethod
    def unchecked(cls, pages: torch.Tensor, table: PageTable, layout: str = "NHD") -> "PagedKV":
        """A paged cache built without its checks (no host sync), as :meth:`PageTable.unchecked`.

        Its ``shape[2]`` is an upper bound (every table entry's page for one request), since
        the longest request is not known without reading the table."""
        cache = object.__new__(cls)
        for name, value in (("pages", pages), ("table", table), ("layout", layout)):
            object.__setattr__(cache, name, value)
        Hkv = pages.shape[2] if layout == "NHD" else pages.shape[1]
        object.__setattr__(cache, "_shape", torch.Size((table.batch, Hkv, table.indices.numel() * cache.page_size, pages.shape[3])))
        return cache

    @property
    def page_size(self) -> int:
        return self.pages.shape[1] if self.layout == "NHD" else self.pages.shape[2]

    @property
    def shape(self) -> torch.Size:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self.pages.dtype

    @property
    def device(self) -> torch.device:
        return self.pages.device

    def element_size(self) -> int:
        return self.pages.element_size()

    def strides(self) -> tuple[int, int, int]:
        """``(page, head, slot)`` strides of ``pages`` in elements."""
        s = self.pages.stride()
        return (s[0], s[2], s[1]) if self.layout == "NHD" else (s[0], s[1], s[2])

    def lengths(self) -> torch.Tensor:
        """``[B]`` int64 keys each request holds."""
        return self.table.lengths(self.page_size)

    def read(self, first: int, last: int) -> torch.Tensor:
        """Keys ``[first, last)`` of every request as ``[B, Hkv, last − first, D]``.

        Slots past a request's length read its last page (whatever it holds): callers only
        use keys inside their ranges, which end at the request's length.
        """
        table = self.table
        t = torch.arange(first, last, device=self.device)  # [n]
        page_of_key = torch.minimum(t[None, :] // self.page_size, table.pages_per_request()[:, None] - 1)  # [B, n]
        page = table.indices.to(torch.int64)[table.indptr[:-1, None].to(torch.int64) + page_of_key]  # [B, n]
        slot = (t % self.page_size).expand_as(page)  # [B, n]
        keys = self.pages[page, slot] if self.layout == "NHD" else self.pages[page, :, slot]  # [B, n, Hkv, D]
        return keys.transpose(1, 2).contiguous()  # the layout of a contiguous cache's slice: the same sums, bit for bit


def read_keys(cache, first: int, last: int) -> torch.Tensor:
    """Keys (or values) ``[first, last)`` of a contiguous or paged cache: ``[B, Hkv, last − first, D]``."""
    if isinstance(cache, PagedKV):
        return cache.read(first, last)
    return cache[:, :, first:last]


def cache_lengths(cache) -> torch.Tensor:
    """``[B]`` int64 keys each request can hold: ``T`` for a contiguous cache, its length for a paged one."""
    if isinstance(cache, PagedKV):
        return cache.lengths()
    B, _, T, _ = cache.shape
    return torch.full((B,), T, dtype=torch.int64, device=cache.device)


def left_padded(cache: torch.Tensor, pads) -> PagedKV:
    """A left-padded contiguous cache seen request by request: key ``t`` of request ``b`` at
    slot ``pads[b] + t`` (a ``transformers`` batch of prompts of different lengths).

    No copy: the table indexes one-slot pages that are the cache's own rows. With
    ``cache [B, Hkv, T, D]`` contiguous, slot ``s`` of request ``b`` starts at element
    ``(b·Hkv·T + s)·D`` and its heads lie ``T·D`` apart, so the pages are the strided view
    ``[N, Hkv, 1, D]`` (``"HND"``) with strides ``(D, T·D, D, 1)`` and request ``b`` owns
    pages ``b·Hkv·T + pads[b] + t`` for ``t < T − pads[b]``.

    Args:
        cache: ``[B, Hkv, T, D]`` (made contiguous if it is not: a copy).
        pads: ``[B]`` integer tensor (or list) of padding slots per request, each ``< T``.

    Returns:
        A :class:`PagedKV` of page size 1 whose request ``b`` holds ``T − pads[b]`` keys.
    """
    cache = cache.contiguous()
    B, Hkv, T, D = cache.shape
    pads = torch.as_tensor(pads, dtype=torch.int64, device=cache.device)
    if pads.shape != (B,) or bool((pads < 0).any()) or bool((pads >= T).any()):
        raise ValueError(f"pads must hold B={B} values in [0, {T}), got {pads.tolist()}")
    n_pages = (B - 1) * Hkv * T + T
    pages = cache.as_strided((n_pages, Hkv, 1, D), (D, T * D, D, 1))
    lengths = T - pads  # [B]
    slot = torch.arange(T, device=cache.device)  # [T]
    owned = slot[None, :] < lengths[:, None]  # [B, T]: request b's first lengths[b] keys
    page = torch.arange(B, device=cache.device)[:, None] * (Hkv * T) + pads[:, None] + slot[None, :]  # [B, T]
    table = PageTable(
        indptr=torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32),
        indices=page[owned].to(torch.int32),
        last_page_len=torch.ones(B, dtype=torch.int32, device=cache.device),
    )
    return PagedKV(pages, table, "HND")


def to_paged(
    k_cache: torch.Tensor, v_cache: torch.Tensor, lengths, page_size: int, layout: str = "NHD", *,
    generator: torch.Generator | None = None, spare_pages: int = 0, fill: float = 0.0,
) -> tuple[PagedKV, PagedKV]:
    """Copy the first ``lengths[b]`` keys and values of each request into pages.

    Args:
        k_cache, v_cache: ``[B, Hkv, T, D]`` contiguous caches.
        lengths: ``[B]`` integer tensor (or list) of keys per request, each in ``[1, T]``.
        page_size: slots per page, ``≥ 1``.
        layout: ``"NHD"`` or ``"HND"``.
        generator: given, the pages are laid out in a random order (a table is not a range).
        spare_pages: pages no request owns, added to the pool.
        fill: the value of every slot no key was copied to (unused pages, the last pages'
            tails); ``nan`` proves that nothing outside the table is read.

    Returns:
        ``(k_paged, v_paged)`` sharing one :class:`PageTable` (int32, on the caches' device).

    Examples:
        Two requests of 5 and 3 keys in pages of 2 slots: 3 pages and 2, each request's last
        page holding one key; reading the keys back gives the contiguous cache's:

        >>> import torch
        >>> from mac_core.kv import read_keys, to_paged
        >>> k = torch.arange(20.0).view(2, 1, 5, 2)          # [B, Hkv, T, D]
        >>> k_paged, v_paged = to_paged(k, -k, [5, 3], page_size=2)
        >>> k_paged.pages.shape                              # [pages, page_size, Hkv, D] (NHD)
        torch.Size([5, 2, 1, 2])
        >>> table = k_paged.table
        >>> table.indptr.tolist(), table.indices.tolist(), table.last_page_len.tolist()
        ([0, 3, 5], [0, 1, 2, 3, 4], [1, 1])
        >>> torch.equal(read_keys(k_paged, 0, 3), k[:, :, :3])
        True
    """
    if not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be an int ≥ 1, got {page_size!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    B, Hkv, T, D = k_cache.shape
    lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
    if len(lengths) != B or any(n < 1 or n > T for n in lengths):
        raise ValueError(f"lengths must hold B={B} values in [1, {T}], got {lengths}")
    n_pages = [-(-n // page_size) for n in lengths]
    total = sum(n_pages) + spare_pages
    device = k_cache.device
    order = (torch.randperm(total, generator=generator) if generator is not None else torch.arange(total)).to(device)
    # every (request, key) copied: key t of request b goes to page order[first_page[b] + t // page_size]
    first_page = torch.tensor([0] + n_pages[:-1], dtype=torch.int64).cumsum(0).to(device)  # [B]
    t = torch.arange(T, device=device)
    owned = t[None, :] < torch.tensor(lengths, device=device)[:, None]  # [B, T]
    b_idx, t_idx = owned.nonzero(as_tuple=True)  # [n] each
    page = order[first_page[b_idx] + t_idx // page_size]
    slot = t_idx % page_size
    pages_shape = (total, page_size, Hkv, D) if layout == "NHD" else (total, Hkv, page_size, D)
    paged = []
    for cache in (k_cache, v_cache):
        pages = torch.full(pages_shape, fill, dtype=cache.dtype, device=device)
        keys = cache.permute(0, 2, 1, 3)[b_idx, t_idx]  # [n, Hkv, D]
        if layout == "NHD":
            pages[page, slot] = keys
        else:
            pages[page, :, slot] = keys
        paged.append(pages)
    indptr = torch.tensor([0] + n_pages, dtype=torch.int64).cumsum(0).to(torch.int32)
    table = PageTable(
        indptr=indptr.to(device),
        indices=order[: sum(n_pages)].to(torch.int32),
        last_page_len=torch.tensor([n - (p - 1) * page_size for n, p in zip(lengths, n_pages)], dtype=torch.int32, device=device),
    )
    return PagedKV(paged[0], table, layout), PagedKV(paged[1], table, layout)
