"""Decisions every rank must share."""


def on_rank_zero(accelerator, decide):
    """decide() on rank 0, its answer on every rank: file-system decisions the ranks must agree on (which
    checkpoint is the latest, whether one exists, what one holds), which a shared file system that lags
    on one node could otherwise answer differently per rank. An exception on rank 0 is raised on every
    rank (the others would otherwise wait for rank 0 for ever)."""
    if accelerator.num_processes == 1:
        return decide()
    from accelerate.utils import broadcast_object_list

    answer = [None]
    if accelerator.is_main_process:
        try:
            answer = [("ok", decide())]
        except Exception as exc:
            answer = [("error", exc)]
    kind, value = broadcast_object_list(answer)[0]
    if kind == "error":
        raise value
    return value
