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


def first_failure(accelerator, failure: str | None) -> str | None:
    """Every rank's own failure (a message, or None) in, the first rank's failure out on every rank, so
    that all of them stop together instead of the others waiting for the failed one in a collective."""
    if accelerator.num_processes == 1:
        return failure
    from accelerate.utils import gather_object

    failures = [f for f in gather_object([failure]) if f is not None]
    return failures[0] if failures else None


def gathered_lists(accelerator, items: list) -> list:
    """Every rank's list, joined in rank order, on every rank."""
    if accelerator.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return [x for part in gather_object([list(items)]) for x in part]


class RankFailure(Exception):
    """Another rank failed at a point all ranks pass together; the message is that rank's."""


def together(accelerator, work):
    """work() on every rank; where it raises on any rank, it raises on all of them at once: the original
    exception where it happened, a RankFailure with its message on the others (which would otherwise
    wait for the failed rank in the next collective, for ever). work() must not itself call a collective
    after a point where one rank can fail."""
    failure = None
    try:
        result = work()
    except Exception as exc:
        failure, raised = f"rank {accelerator.process_index}: {exc}", exc
    agreed = first_failure(accelerator, failure)
    if failure is not None:
        raise raised
    if agreed is not None:
        raise RankFailure(agreed)
    return result
