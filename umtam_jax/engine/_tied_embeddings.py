"""Tied embeddings across a merge's inputs: Hugging Face models that leave their output
embedding (``lm_head``) out of their files because their config ties it to the input one,
merged with models that store it."""

from __future__ import annotations

from collections.abc import Sequence

from umtam_jax.engine._sources import SafetensorsSource, Source


def untie_embeddings(sources: Sequence[Source]) -> None:
    """Where some Hugging Face models of a merge store an output embedding (``lm_head``)
    and others tie it to their input embedding (and leave it out of their files), the
    latter read their input embedding in its place, as mergekit and transformers do; the
    merged model then stores both (and its config says ``tie_word_embeddings: false``).

    Args:
      sources: the merge's inputs; only :class:`SafetensorsSource` ones are changed
        (untied where any input, of either format, stores the output embedding: an
        expert merged before and written as an Orbax checkpoint stores both).

    Example:
      >>> import tempfile, numpy as np
      >>> from umtam_jax import checkpoint, engine
      >>> root = tempfile.mkdtemp()
      >>> emb = {"model": {"embed_tokens": {"weight": np.ones((3, 2), "f4")}}}
      >>> tied = checkpoint.save_safetensors(f"{root}/tied", emb)
      >>> head = {"lm_head": {"weight": np.zeros((3, 2), "f4")}}
      >>> untied = checkpoint.save_safetensors(f"{root}/untied", {**emb, **head})
      >>> a, b = engine.open_source(tied, "a"), engine.open_source(untied, "b")
      >>> engine.untie_embeddings([a, b])
      >>> sorted(a.abstract()), a.read([0])[0].sum()
      (['lm_head', 'model'], np.float32(6.0))

    References:
      transformers' ``tie_word_embeddings``,
      https://huggingface.co/docs/transformers/main_classes/configuration
    """
    from umtam_jax.checkpoint._model_files import TIED_EMBEDDINGS

    unique = list(dict.fromkeys(sources))
    stored = [_stored_names(s) for s in unique]
    safetensors = [s for s in unique if isinstance(s, SafetensorsSource)]
    for output, input_ in TIED_EMBEDDINGS:
        if not any(output in names for names in stored):
            continue
        for source in safetensors:
            if source.ties(output, input_):
                source.tie(output, input_)


def keeps_tied(sources: Sequence[Source]) -> bool:
    """Whether a merge of ``sources`` stays tied: some store an output embedding
    (``lm_head``), and every one that does is a Hugging Face model that ties it
    (:meth:`SafetensorsSource.declares_tied`), so transformers never read those copies.
    The merged output embedding is then written, as mergekit writes it, and the copied
    config keeps ``tie_word_embeddings: true``; otherwise a config that ties is untied
    where both embeddings are written (:func:`umtam_jax.checkpoint.save_safetensors`).

    Args:
      sources: the merge's inputs (the base and the experts).

    Returns:
      Whether the output's config is to keep its tied embeddings.
    """
    from umtam_jax.checkpoint._model_files import TIED_EMBEDDINGS

    storing = [
        (s, output)
        for s in dict.fromkeys(sources)
        for names in [_stored_names(s)]
        for output, _ in TIED_EMBEDDINGS
        if output in names
    ]
    return bool(storing) and all(
        isinstance(s, SafetensorsSource) and s.declares_tied(output) for s, output in storing
    )


def _stored_names(source: Source) -> frozenset[str]:
    """The tensors ``source`` holds, as dotted paths into its parameters (none where its
    parameters are not nested dicts of names)."""
    from umtam_jax.checkpoint import names_from_tree

    if isinstance(source, SafetensorsSource):
        return frozenset(source._names)
    try:
        return frozenset(names_from_tree(source.abstract()))
    except (ValueError, TypeError):
        return frozenset()
