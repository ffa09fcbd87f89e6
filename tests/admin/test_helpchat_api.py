"""The help chat over HTTP against ``dubhe serve --workers 2``: an anonymous visitor's
conversation by cookie, joined to their account when they sign in; limits on length and rate;
text kept as text; the admins' inbox with unread counts and replies; the live stream."""

from __future__ import annotations

import json

import httpx

from tests.admin.conftest import WebClient, WebServer
from tests.web.test_accounts_api import error_of


def post(client: WebClient, text: str) -> httpx.Response:
    return client.api("POST", "/api/chat/messages", {"body": text})


def test_a_visitor_writes_the_admin_reads_and_replies(web: WebServer, admin: WebClient) -> None:
    with web.client() as visitor, web.client() as stranger:
        assert visitor.get("/api/chat").json() == {"conversation_id": None, "messages": []}
        hostile = '<img src=x onerror="alert(1)"> hello'
        sent = post(visitor, hostile)
        assert sent.status_code == 201, sent.text
        conversation_id = sent.json()["conversation_id"]
        cookie = sent.headers["set-cookie"]
        assert "dubhe_chat=" in cookie and "HttpOnly" in cookie
        # Stored and answered as the text it was.
        assert visitor.get("/api/chat").json()["messages"][0]["body"] == hostile
        # Another visitor sees nothing of it.
        assert stranger.get("/api/chat").json() == {"conversation_id": None, "messages": []}

        inbox = admin.get("/admin/api/inbox").json()
        row = next(r for r in inbox["conversations"] if r["conversation_id"] == conversation_id)
        assert row["unread"] == 1 and row["who"].startswith("Visitor #")
        page = admin.get("/admin/inbox")
        assert f'href="/admin/inbox/{conversation_id}"' in page.text
        assert "<img src=x" not in page.text  # escaped
        shown = admin.get(f"/admin/inbox/{conversation_id}")
        assert shown.status_code == 200 and "&lt;img src=x" in shown.text
        inbox = admin.get("/admin/api/inbox").json()
        assert next(r for r in inbox["conversations"]
                    if r["conversation_id"] == conversation_id)["unread"] == 0

        replied = admin.api("POST", f"/admin/api/inbox/{conversation_id}/messages",
                            {"body": "Hi, how can we help?"})
        assert replied.status_code == 201, replied.text
        messages = visitor.get("/api/chat").json()["messages"]
        assert [(m["author"], m["body"]) for m in messages] == [
            ("visitor", hostile), ("admin", "Hi, how can we help?")]
        # Since a given message only.
        after = visitor.get("/api/chat", params={"after": messages[0]["id"]}).json()["messages"]
        assert [m["author"] for m in after] == ["admin"]
        assert admin.get("/admin/api/audit").json()[0]["action"] == "chat.reply"


def test_signing_in_joins_the_anonymous_conversation(web: WebServer) -> None:
    with web.client() as visitor:
        conversation_id = post(visitor, "before signing up").json()["conversation_id"]
        visitor.sign_up()
        mine = visitor.get("/api/chat").json()
        assert mine["conversation_id"] == conversation_id
        assert post(visitor, "after").json()["conversation_id"] == conversation_id
        visitor.api("POST", "/api/auth/logout")
        # Signed out, the cookie no longer opens what now belongs to the account.
        assert visitor.get("/api/chat").json()["conversation_id"] is None
        # Writing again, signed out, starts a new conversation.
        again = post(visitor, "signed out now")
        assert again.status_code == 201, again.text
        assert again.json()["conversation_id"] != conversation_id
        assert [m["body"] for m in visitor.get("/api/chat").json()["messages"]] == [
            "signed out now"]


def test_length_and_rate_limits(web: WebServer) -> None:
    with web.client() as visitor:
        too_long = post(visitor, "x" * 2001)
        assert too_long.status_code == 422
        assert error_of(too_long)["param"] == "body"
        assert post(visitor, "   ").status_code == 422
        answers = [post(visitor, f"message {n}").status_code for n in range(7)]
        assert answers[:6] == [201] * 6
        limited = post(visitor, "one more")
        assert limited.status_code == 429
        assert error_of(limited)["code"] == "rate_limit_exceeded"
        assert limited.headers["retry-after"]
    # A new cookie from the same address does not reset the address's hourly limit.
    ip = "10.250.250.250"
    with web.client(ip) as first:
        for n in range(6):
            assert post(first, f"first {n}").status_code == 201
    sent = 6
    while sent < 60:
        with web.client(ip) as again:
            for n in range(6):
                assert post(again, f"again {n}").status_code == 201
                sent += 1
                if sent == 60:
                    break
    with web.client(ip) as last:
        assert post(last, "over the hour's limit").status_code == 429


def test_writing_needs_the_csrf_token(web: WebServer) -> None:
    with web.client() as visitor:
        refused = visitor.api("POST", "/api/chat/messages", {"body": "hi"}, csrf=False)
        assert refused.status_code == 403


def test_the_stream_delivers_a_reply_live(web: WebServer, admin: WebClient) -> None:
    with web.client() as visitor:
        conversation_id = post(visitor, "are you there?").json()["conversation_id"]
        last = visitor.get("/api/chat").json()["messages"][-1]["id"]
        with visitor.http.stream("GET", "/api/chat/events", params={"after": last},
                                 headers={"accept": "text/event-stream"}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.iter_lines()
            assert next(lines) == "event: hello"
            assert json.loads(next(lines).removeprefix("data: "))["worker"]
            admin.api("POST", f"/admin/api/inbox/{conversation_id}/messages",
                      {"body": "yes, live"})
            for line in lines:
                if line.startswith("data: "):
                    assert json.loads(line.removeprefix("data: "))["body"] == "yes, live"
                    break
