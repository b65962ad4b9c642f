"""End to end: images sent with a prompt to ``/run`` reach the agent as image blocks.

The real server, the real SDK, the fake CLI, whose ``[[fake:images]]`` directive answers
with the image blocks its user message brought (type and decoded size). What the real
CLI sends on to the model: tests/real_cli/test_e2e_real_cli_compat.py.
"""

from __future__ import annotations

import pytest
import trio

from tests.support import sse
from tests.support.harness import AUTH, for_one_test, shared_service
from tests.support.images import GIF, JPEG, b64, png

MAX_IMAGE_BYTES = 4096


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    env = {"MAX_IMAGES": "3", "MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES)}
    with shared_service(tmp_path_factory.mktemp("images"), env=env) as service:
        yield service


@pytest.fixture
async def service(shared):
    return await for_one_test(shared)


def image(data: bytes, media_type: str = "image/png") -> dict[str, str]:
    return {"mediaType": media_type, "data": b64(data)}


async def test_images_reach_the_agent_as_image_blocks(service):
    with trio.fail_after(30):
        async with service.client() as client:
            body = {
                "prompt": "[[fake:images]] what is this?",
                "images": [image(png()), image(JPEG, "image/jpeg"), image(GIF, "image/gif")],
            }
            reply = await client.post("/run", headers=AUTH, json=body)
            assert reply.status_code == 200, reply.text
            expected = f"images: image/png {len(png())}, image/jpeg {len(JPEG)}, image/gif 43"
            assert reply.json()["output"] == expected
            # The largest image allowed, exactly.
            body = {"prompt": "[[fake:images]]", "images": [image(png(size=MAX_IMAGE_BYTES))]}
            reply = await client.post("/run", headers=AUTH, json=body)
            assert reply.json()["output"] == f"images: image/png {MAX_IMAGE_BYTES}"
            # Without images, the prompt alone (a string, as before).
            reply = await client.post("/run", headers=AUTH, json={"prompt": "[[fake:images]]"})
            assert reply.json()["output"] == "images: none"


async def test_images_in_a_stream_and_in_a_session_turn(service):
    with trio.fail_after(30):
        async with service.client() as client:
            body = {"prompt": "[[fake:images]]", "images": [image(png())], "stream": True}
            _, events = await sse.stream_run(client, AUTH, body)
            assert events[-1].name == "result"
            assert events[-1].data["output"] == f"images: image/png {len(png())}"
            for turn in range(2):
                body = {"prompt": "[[fake:images]]", "sessionId": "pictures", "images": []}
                if turn:
                    body["images"] = [image(JPEG, "image/jpeg")]
                reply = await client.post("/run", headers=AUTH, json=body)
                assert reply.status_code == 200, reply.text
                shown = f"image/jpeg {len(JPEG)}" if turn else "none"
                assert reply.json()["output"] == f"images: {shown}"
            await client.request("DELETE", "/session", headers=AUTH, json={"sessionId": "pictures"})


@pytest.mark.parametrize(
    ("images", "status", "message"),
    [
        ({"mediaType": "image/png"}, 400, "images: expected a list"),
        ([image(png(), "image/bmp")], 400, "images[0]: media type 'image/bmp' is not accepted"),
        ([image(png(), "image/svg+xml")], 400, "is not accepted; accepted: image/png"),
        ([{"mediaType": "image/png", "data": "not base64!"}], 400, "not valid base64"),
        ([{"mediaType": "image/png"}], 400, "images[0]: the image's data must be"),
        (["x"], 400, "images[0]: expected an object"),
        ([image(JPEG, "image/png")], 400, "not an image/png image (it looks like image/jpeg)"),
        ([image(b"hello", "image/gif")], 400, "it is not an image the model reads"),
        ([image(png())] * 4, 400, "at most 3 images per request (MAX_IMAGES), got 4"),
        ([image(png(size=MAX_IMAGE_BYTES + 1))], 413, f"exceeds {MAX_IMAGE_BYTES} bytes"),
    ],
)
async def test_bad_images_are_refused_naming_the_image(service, images, status, message):
    with trio.fail_after(30):
        async with service.client() as client:
            for stream in (False, True):
                body = {"prompt": "hi", "images": images, "stream": stream}
                reply = await client.post("/run", headers=AUTH, json=body)
                assert reply.status_code == status, reply.text
                assert message in reply.json()["error"]


async def test_the_body_limit_grows_with_the_images_allowed(service):
    # 1 MiB, and for each of MAX_IMAGES images its base64 and 256 bytes.
    limit = 1024 * 1024 + 3 * (4 * -(-MAX_IMAGE_BYTES // 3) + 256)
    with trio.fail_after(30):
        async with service.client() as client:
            under = {"prompt": "hi", "padding": "x" * (limit - 100)}
            reply = await client.post("/run", headers=AUTH, json=under)
            assert reply.status_code == 200, reply.text
            over = {"prompt": "hi", "padding": "x" * limit}
            reply = await client.post("/run", headers=AUTH, json=over)
            assert reply.status_code == 413
            assert reply.json()["error"] == f"Request body exceeds {limit} bytes"
