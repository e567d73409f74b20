"""An application's own module named `worker`, as gateways often have one."""

ROLE = "the application's worker"


def agent(n: int) -> dict:
    """A run target defined next to the application's own `worker` and `ipc`."""
    import ipc
    import worker
    from deadstop.worker import egress

    return {"doubled": egress.call("double", n), "mine": [worker.ROLE, ipc.ROLE]}
