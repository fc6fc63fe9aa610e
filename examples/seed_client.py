#!/usr/bin/env python3
"""The seed document's client flow with `requests`, unchanged in spirit: form
login, a three-turn Chinese conversation on /chatCompletion, then the same on
/chatCompletionStream read as Server-Sent Events. Exits non-zero when any step
deviates from the contract. Usage: seed_client.py [BASE_URL]"""

import json
import sys

import requests

BASE = (sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080").rstrip("/") + "/"

auth = requests.post(BASE + "auth", data={"username": "temporary_user", "password": "default_password"}, timeout=30)
if auth.status_code != 200:
    sys.exit(f"login failed: {auth.status_code} {auth.text}")
token = auth.json()["accessToken"]
headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}

history = [
    {"role": "user", "Content": "你好，你是谁？"},
    {"role": "assistant", "Content": "你好，我是小智，openEuler 社区助手。"},
    {"role": "user", "Content": "请介绍一下 openEuler。\n它是什么？"},
]

reply = requests.post(BASE + "chatCompletion", data=json.dumps(history), headers=headers, timeout=30)
if reply.status_code != 200:
    sys.exit(f"chatCompletion failed: {reply.status_code} {reply.text}")
message = reply.json()["message"]
print("message:", message)

stream_headers = dict(headers, Accept="text/event-stream")
parts, events, data_lines = [], [], []
with requests.post(BASE + "chatCompletionStream", data=json.dumps(history), headers=stream_headers,
                   stream=True, timeout=30) as r:
    if r.status_code != 200 or not r.headers.get("Content-Type", "").startswith("text/event-stream"):
        sys.exit(f"chatCompletionStream failed: {r.status_code} {r.headers}")
    event = None
    for line in r.iter_lines(decode_unicode=True):
        if line == "":
            if event is not None:
                events.append((event, "\n".join(data_lines)))
            event, data_lines = None, []
        elif line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            data_lines.append(line[len("data: "):])

if any(kind != "message" for kind, _ in events):
    sys.exit(f"unexpected events: {events}")
if len(events) < 3 or events[0][1] != "" or events[-1][1] != "":
    sys.exit(f"first and last events must be empty: {events}")
streamed = "".join(data for _, data in events)
print("streamed:", streamed)
if streamed != message:
    sys.exit(f"streamed text {streamed!r} differs from the complete answer {message!r}")
print("ok")
