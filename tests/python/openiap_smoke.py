"""Drives a running ocmesh with the unmodified `openiap` package from PyPI.

Usage: python openiap_smoke.py URL USERNAME PASSWORD [TAG]
       python openiap_smoke.py --worker URL USERNAME PASSWORD QUEUE  (the second client)

URL is grpc://HOST:PORT or ws://HOST:PORT/ws/v2. TAG (default "py") names
this run's queue (TAGjobs) and documents (_type TAGtest), so runs over
both transports can share one server.

Signs in (and fails to with a wrong password), inserts and queries
documents, creates work-item queues (TAGjobs routing to TAGdone), pushes an
item, pops it, completes it, pushes an item with a file, pops it with its
file from a second client, completes it there and pops its copy with the
file from TAGdone, watches a collection (a JSONPath filter), makes an RPC
call through message queues (its own reply queue and service queue), lists
collections, upserts, aggregates, uploads and downloads a file, drops a
collection (and fails to drop `users`), and checks each answer. Prints one line `OPENIAP-OK {json}` and exits 0
on success; prints `OPENIAP-FAIL reason` and exits 1 otherwise. Every call
has a timeout, and the process exits with os._exit so the client's
background threads cannot keep it alive.
"""

import asyncio
import json
import os
import sys
import tempfile
import traceback

CALL_TIMEOUT = 20


async def call(what, awaitable):
    try:
        return await asyncio.wait_for(awaitable, CALL_TIMEOUT)
    except asyncio.TimeoutError:
        raise AssertionError(f"{what}: no answer within {CALL_TIMEOUT} s")


def check(cond, what):
    if not cond:
        raise AssertionError(what)


async def main(url, username, password, tag):
    from openiap import Client
    from openiap.protowrap import protowrap
    from proto import base_pb2, workitems_pb2

    client = Client(url)
    TYPE, QUEUE, DONE = f"{tag}test", f"{tag}jobs", f"{tag}done"

    # A wrong password is an error reply, surfaced by the client as an exception.
    try:
        await call("bad signin", client.Signin(username, password + "-wrong"))
        raise AssertionError("signin with a wrong password succeeded")
    except ValueError as e:
        check("wrong password" in str(e), f"bad signin error: {e}")

    user = await call("signin", client.Signin(username, password))
    check(user.username == username, f"signed in as {user.username!r}")
    check(client.jwt, "signin returned no jwt")
    roles = sorted(r.name for r in user.roles)

    a = await call("insertone", client.InsertOne({"name": "py-a", "_type": TYPE, "n": 1}, "entities"))
    check(a.get("_id") and a.get("name") == "py-a", f"insertone returned {a}")
    many = await call(
        "insertmany",
        client.InsertMany([{"name": "py-b", "_type": TYPE, "n": 2}, {"name": "py-c", "_type": TYPE, "n": 3}], "entities"),
    )
    check(len(many) == 2, f"insertmany returned {many}")
    docs = await call(
        "query",
        client.Query(collectionname="entities", query={"_type": TYPE}, orderby={"n": -1}, top=10),
    )
    check([d["name"] for d in docs] == ["py-c", "py-b", "py-a"], f"query returned {docs}")
    count = await call("count", client.Count({"_type": TYPE}, "entities"))
    check(count == 3, f"count returned {count}")
    updated = await call("updateone", client.UpdateOne({**a, "name": "py-a2"}, "entities"))
    check(updated["name"] == "py-a2" and updated["_version"] == 1, f"updateone returned {updated}")
    old = await call("getdocumentversion", client.GetDocumentVersion(a["_id"], "entities", 0))
    check(old["name"] == "py-a", f"version 0 is {old}")
    deleted = await call("deleteone", client.DeleteOne(many[0]["_id"], "entities"))
    check(deleted == 1, f"deleteone returned {deleted}")

    # The 0.0.37 client has no AddWorkItemQueue helper: send its message raw.
    # Items completed in QUEUE are routed to DONE (its success_wiq).
    for name, success in [(DONE, ""), (QUEUE, DONE)]:
        request = base_pb2.Envelope(command="addworkitemqueue")
        request.data.Pack(workitems_pb2.AddWorkItemQueueRequest(name=name, maxretries=3, success_wiq=success))
        await call(f"addworkitemqueue {name}", protowrap.RPC(client, request))
    queues = await call("query mq", client.Query(collectionname="mq", query={"name": QUEUE}))
    check(len(queues) == 1, f"queue document: {queues}")

    pushed = await call("pushworkitem", client.PushWorkitem(QUEUE, "job-1", {"order": 42}))
    check(pushed.state == "new" and pushed.wiq == QUEUE, f"pushed {pushed}")
    popped = await call("popworkitem", client.PopWorkitem(QUEUE))
    check(popped is not None and getattr(popped, "_id") == getattr(pushed, "_id"), f"popped {popped}")
    check(popped.state == "processing", f"popped state {popped.state}")
    check(json.loads(popped.payload) == {"order": 42}, f"payload {popped.payload}")
    popped.state = "successful"
    popped.payload = json.dumps({"order": 42, "shipped": True})
    done = await call("updateworkitem", client.UpdateWorkitem(popped))
    check(done is not None and done.state == "successful", f"updateworkitem returned {done}")
    empty = await call("popworkitem (empty)", client.PopWorkitem(QUEUE))
    check(empty is None, f"empty queue popped {empty}")

    # A work item with a file: pushed by this client, popped with its file
    # by a second one, completed there, and routed to DONE with the file.
    attachment = f"attachment for {tag}: ".encode() + bytes(range(256))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"{tag}-attachment.bin")
        with open(path, "wb") as f:
            f.write(attachment)
        with_file = await call("pushworkitem with file", client.PushWorkitem(QUEUE, "job-file", {"order": 7}, files=[path]))
    check(len(with_file.files) == 1 and with_file.files[0].filename == f"{tag}-attachment.bin", f"pushed {with_file}")
    check(getattr(with_file.files[0], "_id") and not with_file.files[0].file, f"pushed file reference {with_file.files}")
    # The second client runs in its own process: openiap 0.0.37 keeps its
    # connection state in class attributes, so two clients in one process
    # end each other's streams.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, os.path.abspath(__file__), "--worker", url, username, password, QUEUE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 3 * CALL_TIMEOUT)
    lines = [l[len("WORKER-OK "):] for l in out.decode().splitlines() if l.startswith("WORKER-OK ")]
    check(proc.returncode == 0 and lines, f"second client failed: {out.decode()} {err.decode()[-2000:]}")
    other = json.loads(lines[0])
    check(other["id"] == getattr(with_file, "_id"), f"second client popped {other}")
    check(other["files"] == [[f"{tag}-attachment.bin", attachment.hex(), False]], f"popped files {other['files']}")
    check(other["state"] == "successful", f"second client completed {other}")
    routed = None
    for _ in range(3):
        item = await call("popworkitem success queue", client.PopWorkitem(DONE, includefiles=True))
        if item is None or item.name == "job-file":
            routed = item
            break
    check(routed is not None and routed.wiq == DONE, f"no job-file in {DONE}: {routed}")
    check(routed.payload and json.loads(routed.payload) == {"order": 7}, f"routed payload {routed.payload}")
    check([f.file for f in routed.files] == [attachment], f"routed item's files {routed.files}")

    # Bad input gets an error and the connection keeps working.
    try:
        await call("query bad", client.Query(collectionname="entities", query={"n": {"$where": "1"}}))
        raise AssertionError("a query with an unsupported operator succeeded")
    except ValueError as e:
        check("SERVER ERROR" in str(e), f"bad query error: {e}")
    still = await call("count again", client.Count({"_type": TYPE}, "entities"))
    check(still == 2, f"count after delete returned {still}")


    # Watch: the server pushes a watchevent for a matching insert.
    seen = asyncio.Queue()

    async def on_change(_client, operation, document):
        await seen.put((operation, document))

    watch_id = await call("watch", client.Watch("entities", [f"$.[?(@._type == '{TYPE}w')]"], on_change))
    check(watch_id, "watch returned no id")
    await call("insertone watched", client.InsertOne({"name": "py-w", "_type": f"{TYPE}w"}, "entities"))
    operation, document = await call("watchevent", seen.get())
    check(operation == "insert" and document.get("name") == "py-w", f"watch event {operation} {document}")
    await call("unwatch", client.UnWatch(watch_id))

    # Message queues: an RPC round trip through the client's own reply queue.
    async def on_reply(_client, _msg, _payload):
        return None

    async def service(_client, _msg, payload):
        return {"answer": payload["question"] * 7}

    reply_queue = await call("registerqueue (reply)", client.RegisterQueue("", on_reply))
    check(reply_queue, "no temporary queue name")
    rpc_queue = await call("registerqueue", client.RegisterQueue(f"{tag}rpc", service))
    check(rpc_queue == f"{tag}rpc", f"registered {rpc_queue}")
    answer = await call("queuemessage rpc", client.QueueMessage(f"{tag}rpc", {"question": 6}, rpc=True))
    check(answer == {"answer": 42}, f"rpc answered {answer}")

    # Collections and upserts.
    collections = await call("listcollections", client.ListCollections())
    names = [c["name"] for c in collections]
    check("entities" in names and "mq" in names, f"collections {names}")
    upserted = await call(
        "insertorupdatemany",
        client.InsertOrUpdateMany([{"name": "py-u", "_type": TYPE, "n": 9}], "entities", uniqeness="name"),
    )
    check(len(upserted) == 1 and upserted[0]["n"] == 9, f"insertorupdatemany returned {upserted}")
    again = await call(
        "insertorupdatemany again",
        client.InsertOrUpdateMany([{"name": "py-u", "_type": TYPE, "n": 10}], "entities", uniqeness="name"),
    )
    check(again[0]["_id"] == upserted[0]["_id"] and again[0]["n"] == 10, f"upsert returned {again}")
    totals = await call(
        "aggregate",
        client.Aggregate(
            [{"$match": {"_type": TYPE}}, {"$group": {"_id": None, "n": {"$sum": "$n"}, "docs": {"$count": {}}}}],
            "entities",
        ),
    )
    check(len(totals) == 1 and totals[0]["docs"] == 3, f"aggregate returned {totals}")
    # Files: the 0.0.37 client has no upload helper, so send the upload and
    # its parts raw (its reply type is unknown to the client, which then
    # resolves the call with None); download with the client's DownloadFile.
    upload = base_pb2.Envelope(command="upload")
    upload.data.Pack(base_pb2.UploadRequest(filename=f"{tag}-hello.txt", mimetype="text/plain"))
    rid = str(next(protowrap.uniqueid()))
    uploaded = protowrap.RPC(client, upload, rid)
    for command, part in [
        ("beginstream", base_pb2.BeginStream()),
        ("stream", base_pb2.Stream(data=b"hello ")),
        ("stream", base_pb2.Stream(data=b"world")),
        ("endstream", base_pb2.EndStream()),
    ]:
        envelope = base_pb2.Envelope(command=command, rid=rid)
        envelope.data.Pack(part)
        client.grpcqueue.put(envelope)
    await call("upload", uploaded)
    with tempfile.TemporaryDirectory() as out:
        got = await call("download", client.DownloadFile(Filename=f"{tag}-hello.txt", OutPath=out))
        check(got.filename == f"{tag}-hello.txt", f"downloaded {got}")
        with open(os.path.join(out, got.filename), "rb") as f:
            content = f.read()
    check(content == b"hello world", f"downloaded content {content!r}")

    # dropcollection: the collection's documents go, and so does its name;
    # the node's own collections are refused.
    dropped = f"{tag}drop"
    doomed = await call("insertone to drop", client.InsertOne({"name": "gone"}, dropped))
    await call("dropcollection", client.DropCollection(dropped))
    names = [c["name"] for c in await call("listcollections after drop", client.ListCollections())]
    check(dropped not in names and "entities" in names, f"collections after dropcollection {names}")
    try:
        await call("dropcollection users", client.DropCollection("users"))
        raise AssertionError("dropcollection users succeeded")
    except ValueError as e:
        check("users" in str(e), f"dropcollection users error: {e}")

    return {
        "user": user.username,
        "roles": roles,
        "workitem": getattr(done, "_id"),
        "fileitem": other["id"],
        "file_bytes": len(routed.files[0].file),
        "routed": routed.wiq,
        "dropped": doomed["_id"],
        "state": done.state,
        "queue": QUEUE,
        "watch": operation,
        "rpc": answer,
        "download": content.decode(),
    }


async def worker(url, username, password, queue):
    """The second client: pops an item with its files, completes it."""
    from openiap import Client

    client = Client(url)
    await call("worker signin", client.Signin(username, password))
    item = await call("worker popworkitem", client.PopWorkitem(queue, includefiles=True))
    check(item is not None, f"worker popped nothing from {queue}")
    files = [[f.filename, f.file.hex(), f.compressed] for f in item.files]
    item.state = "successful"
    done = await call("worker updateworkitem", client.UpdateWorkitem(item))
    check(done is not None, "worker updateworkitem returned nothing")
    return {"id": getattr(item, "_id"), "files": files, "state": done.state}


def run_and_exit(label, start):
    """Prints `LABEL-OK {json}` with what start() returns, or `LABEL-FAIL
    reason`, and exits (0 or 1) with os._exit so the client's background
    threads cannot keep the process alive."""
    code = 1
    try:
        result = asyncio.run(start())
        print(f"{label}-OK " + json.dumps(result), flush=True)
        code = 0
    except BaseException as e:  # noqa: BLE001 - report anything, then exit
        traceback.print_exc()
        print(f"{label}-FAIL {e!r}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        run_and_exit("WORKER", lambda: worker(*sys.argv[2:6]))
    tag = sys.argv[4] if len(sys.argv) > 4 else "py"
    run_and_exit("OPENIAP", lambda: main(*sys.argv[1:4], tag))
