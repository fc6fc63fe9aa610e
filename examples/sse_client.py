#!/usr/bin/env python3
"""The seed's streaming read done with a standard SSE client library
(sseclient-py, `pip install sseclient-py`) on top of `requests` instead of
hand-parsed lines: form login, the seed's three-turn conversation, then a reply
with paragraph breaks. Each streamed answer must equal the complete answer from
/chatCompletion byte for byte. Exits non-zero on any deviation.
Usage: sse_client.py [BASE_URL]"""

import json
import sys

import requests
import sseclient

BASE = (sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080").rstrip("/") + "/"

auth = requests.post(BASE + "auth", data={"username": "temporary_user", "password": "default_password"}, timeout=30)
if auth.status_code != 200:
    sys.exit(f"login failed: {auth.status_code} {auth.text}")
headers = {"Authorization": "Bearer " + auth.json()["accessToken"], "Content-Type": "application/json"}

SEED_HISTORY = [
    {"role": "user", "Content": "你好，你是谁？"},
    {"role": "assistant", "Content": "你好，我是小智，openEuler 社区助手。"},
    {"role": "user", "Content": "请介绍一下 openEuler。\n它是什么？"},
]
# The simulator's `newlines` reply has bare "\n" and "\n\n" tokens: a conforming
# SSE client must give back every line break.
NEWLINES_HISTORY = SEED_HISTORY[:2] + [{"role": "user", "Content": "#sim reply=newlines\n请分段回答。"}]


def complete(history):
    """The whole answer from /chatCompletion."""
    reply = requests.post(BASE + "chatCompletion", data=json.dumps(history), headers=headers, timeout=30)
    if reply.status_code != 200:
        sys.exit(f"chatCompletion failed: {reply.status_code} {reply.text}")
    return reply.json()["message"]


def streamed(history):
    """The (event, data) pairs of /chatCompletionStream, parsed by sseclient-py."""
    stream_headers = dict(headers, Accept="text/event-stream")
    with requests.post(BASE + "chatCompletionStream", data=json.dumps(history), headers=stream_headers,
                       stream=True, timeout=30) as r:
        if r.status_code != 200 or not r.headers.get("Content-Type", "").startswith("text/event-stream"):
            sys.exit(f"chatCompletionStream failed: {r.status_code} {r.headers}")
        return [(e.event, e.data) for e in sseclient.SSEClient(r).events()]


for name, history in (("seed", SEED_HISTORY), ("newlines", NEWLINES_HISTORY)):
    message = complete(history)
    events = streamed(history)
    if any(kind != "message" for kind, _ in events):
        sys.exit(f"{name}: unexpected events: {events}")
    if len(events) < 3 or events[0][1] != "" or events[-1][1] != "":
        sys.exit(f"{name}: first and last events must be empty: {events}")
    text = "".join(data for _, data in events)
    print(f"{name}: {json.dumps({'events': len(events), 'text': text}, ensure_ascii=False)}")
    if text != message:
        sys.exit(f"{name}: streamed text {text!r} differs from the complete answer {message!r}")
print("ok")
