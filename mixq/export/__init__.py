"""`mixq export`: a mixed-precision mix written as one compressed-tensors checkpoint.

schemes  - the compressed-tensors scheme of each stored format (refuses the rest)
convert  - lossless conversion of one weight's tensors
prepare  - uniform MoE experts, smoothing folded into norms, schemes for a whole plan
engines  - what vLLM / SGLang accept, checked before writing
writer   - streaming shards into a temporary directory, config.json, rename into place
cli      - the `mixq export` subcommand
"""

__all__ = ["ExportReport", "export_mix"]


def __getattr__(name: str):
    # lazy: `mixq --help` and the other subcommands must not import torch for this
    if name in __all__:
        from mixq.export import writer

        return getattr(writer, name)
    raise AttributeError(name)
