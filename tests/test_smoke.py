"""A first end-to-end check that the harness and daemon work together."""


def test_ping_and_create(kd):
    """A created task with no parents is ready and shows up in list."""
    assert kd.call("system.ping")["pong"] is True
    t = kd.create("hello")
    assert t["status"] == "ready" and t["id"].startswith("t_")
    listed = kd.ctl_json("list")
    assert [x["id"] for x in listed] == [t["id"]]
