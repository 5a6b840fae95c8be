"""hopformer: transformers on long sequences whose attention runs on a sparse graph.

The centre is Diffuser (multi-hop attention diffusion); around it stand Routing, Combiner,
Hypercube attention and the sparse baselines. Layers, bottom to top: ``graphs`` (patterns),
``ops`` (kernels), ``attention`` (modules), ``models``, ``analysis``, ``data``, ``train``.
"""

__version__ = "0.1.0"
