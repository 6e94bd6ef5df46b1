"""The download command, offline: a threaded HTTP server on 127.0.0.1 serves small generated zips."""

import io
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

import dataset
import download
from download import DownloadError


def png_bytes(array, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def official_zips(n=3):
    """The train zips of the official layout, with the licence files the real ones carry."""
    images, masks = io.BytesIO(), io.BytesIO()
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(images, "w") as zi, zipfile.ZipFile(masks, "w") as zm:
        zi.writestr("ISIC2018_Task1-2_Training_Input/LICENSE.txt", "CC BY-NC 4.0")
        zi.writestr("ISIC2018_Task1-2_Training_Input/ATTRIBUTION.txt", "ISIC")
        zm.writestr("ISIC2018_Task1_Training_GroundTruth/LICENSE.txt", "CC BY-NC 4.0")
        for i in range(n):
            zi.writestr(f"ISIC2018_Task1-2_Training_Input/ISIC_{i:07d}.jpg",
                        png_bytes(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), "JPEG"))
            mask = np.zeros((24, 32), np.uint8)
            mask[5:15, 8:20] = 255
            zm.writestr(f"ISIC2018_Task1_Training_GroundTruth/ISIC_{i:07d}_segmentation.png", png_bytes(mask))
    return {"ISIC2018_Task1-2_Training_Input.zip": images.getvalue(),
            "ISIC2018_Task1_Training_GroundTruth.zip": masks.getvalue()}


class Server:
    """Serves `files`, honours `Range: bytes=N-`, and can cut chosen transfers off halfway."""

    def __init__(self, files):
        self.files = dict(files)
        self.requests = []  # (path, Range header or None)
        self.cut_next = set()  # names whose next transfer stops after half the body
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                if name not in server.files:
                    self.send_error(404)
                    return
                body = server.files[name]
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(body) and rng:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if name in server.cut_next:
                    server.cut_next.discard(name)
                    self.wfile.write(body[start: start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/2018/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def quiet(*_):
    pass


def test_download_resumes_an_interrupted_transfer_and_extracts(tmp_path):
    files = official_zips()
    with Server(files) as server:
        server.cut_next.add("ISIC2018_Task1-2_Training_Input.zip")
        root = download.download_isic(tmp_path / "isic", ["train"], base_url=server.url,
                                      expected_counts={"train": 3}, backoff=0, log=quiet)
    name = "ISIC2018_Task1-2_Training_Input.zip"
    calls = [r for n, r in server.requests if n == name]
    half = len(files[name]) // 2
    assert calls == [None, f"bytes={half}-"]  # the second request resumed where the first stopped
    assert (root / "downloads" / name).read_bytes() == files[name]
    pairs = dataset.find_pairs(root)  # LICENSE.txt and ATTRIBUTION.txt are ignored
    assert [s.id for s in pairs["train"]] == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]


def test_partial_file_from_an_earlier_run_is_resumed(tmp_path):
    files = official_zips()
    name = "ISIC2018_Task1_Training_GroundTruth.zip"
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / (name + ".part")).write_bytes(files[name][:100])
    with Server(files) as server:
        download.download_isic(tmp_path, ["train"], base_url=server.url, expected_counts=None, log=quiet)
    assert ("ISIC2018_Task1_Training_GroundTruth.zip", "bytes=100-") in server.requests
    assert (downloads / name).read_bytes() == files[name]
    assert not (downloads / (name + ".part")).exists()


def test_second_run_downloads_nothing(tmp_path):
    with Server(official_zips()) as server:
        download.download_isic(tmp_path, ["train"], base_url=server.url, expected_counts=None, log=quiet)
        count = len(server.requests)
        download.download_isic(tmp_path, ["train"], base_url=server.url, expected_counts=None, log=quiet)
    assert len(server.requests) == count == 2


def test_image_count_check(tmp_path):
    with Server(official_zips()) as server:
        with pytest.raises(DownloadError, match=r"holds 3 images, expected 2594.*--no-check-counts"):
            download.download_isic(tmp_path, ["train"], base_url=server.url, log=quiet)


def test_corrupt_zip_is_downloaded_again_then_refused(tmp_path):
    files = official_zips()
    name = "ISIC2018_Task1-2_Training_Input.zip"
    files[name] = files[name][:-200] + bytes(200)  # damaged central directory
    with Server(files) as server:
        with pytest.raises(DownloadError, match=rf"{name} is corrupt .* after two downloads"):
            download.download_isic(tmp_path, ["train"], base_url=server.url, expected_counts=None, log=quiet)
    assert [n for n, _ in server.requests].count(name) == 2
    assert not (tmp_path / "downloads" / name).exists()


@pytest.mark.parametrize("member", ["../evil.txt", "ISIC2018_Task1-2_Training_Input/../../evil.txt",
                                    "/tmp/evil.txt", "C:/evil.txt"])
def test_zip_slip_is_refused_before_anything_is_written(tmp_path, member):
    archive = tmp_path / "crafted.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg", b"fine")
        zf.writestr(member, b"owned")
    target = tmp_path / "root"
    target.mkdir()
    with pytest.raises(DownloadError, match="unsafe entry"):
        download.safe_extract(archive, target)
    assert list(target.iterdir()) == []
    assert not (tmp_path / "evil.txt").exists()


def test_zip_symlink_is_refused(tmp_path):
    archive = tmp_path / "link.zip"
    info = zipfile.ZipInfo("ISIC2018_Task1-2_Training_Input/link")
    info.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DownloadError, match="unsafe entry"):
        download.safe_extract(archive, tmp_path / "root")


def test_no_network_is_one_line(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    with pytest.raises(DownloadError, match="cannot reach .*no network") as exc:
        download.download_isic(tmp_path, ["val"], base_url=url, backoff=0, log=quiet)
    assert "\n" not in str(exc.value)
    with pytest.raises(SystemExit) as exit_info:
        download.main(["--root", str(tmp_path), "--splits", "val", "--base-url", url])
    assert str(exit_info.value.code).startswith("error: cannot reach") and "\n" not in str(exit_info.value.code)


def test_missing_file_on_the_server(tmp_path):
    with Server({}) as server:
        with pytest.raises(DownloadError, match="answered 404.*--base-url"):
            download.download_isic(tmp_path, ["test"], base_url=server.url, log=quiet)


def test_download_command(tmp_path):
    with Server(official_zips()) as server:
        download.main(["--root", str(tmp_path), "--splits", "train", "--base-url", server.url,
                      "--no-check-counts"])
    assert len(dataset.find_pairs(tmp_path)["train"]) == 3


def test_masks_only_fetches_the_ground_truth_alone(tmp_path):
    """For a course's copy that has the images: only the ground-truth zip is requested and counted."""
    with Server(official_zips(n=3)) as server:
        download.main(["--root", str(tmp_path), "--splits", "train", "--base-url", server.url, "--masks-only",
                       "--no-check-counts"])
        assert [name for name, _ in server.requests] == ["ISIC2018_Task1_Training_GroundTruth.zip"]
    assert len(list((tmp_path / "ISIC2018_Task1_Training_GroundTruth").glob("*_segmentation.png"))) == 3
    assert not (tmp_path / "ISIC2018_Task1-2_Training_Input").exists()
    with Server(official_zips(n=3)) as server, pytest.raises(DownloadError, match=r"holds 3 masks, expected 5"):
        download.download_isic(tmp_path / "counted", ["train"], base_url=server.url, masks_only=True,
                               expected_counts={"train": 5}, log=quiet)
