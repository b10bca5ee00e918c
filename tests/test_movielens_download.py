"""MovieLens on first use: ml-100k.zip downloaded into the cache (checksums verified, unzipped atomically), served
here by a local HTTP server on 127.0.0.1 from a zip built on the fly from ``../shared/data/movielens/ml-100k``."""

import hashlib
import http.server
import io
import os
import subprocess
import sys
import threading
import time
import zipfile

import pytest

from mass_dpo.data import cache_dir, load_benchmark, locate
from mass_dpo.data import movielens


def _zip(folder, edit=None) -> bytes:
    """The release folder as ``ml-100k.zip`` (members ``ml-100k/<file>``); ``edit(name, bytes)`` may alter a file."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("ml-100k/", b"")
        for path in sorted(folder.iterdir()):
            data = path.read_bytes()
            z.writestr(f"ml-100k/{path.name}", edit(path.name, data) if edit else data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def release(shared_data):
    return shared_data / "movielens" / "ml-100k"


@pytest.fixture
def server():
    """Serves ``routes[path] = bytes`` (paths starting ``/slow`` sleep 3 s first); ``requests`` lists the paths
    asked for."""
    routes, requests = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if self.path.startswith("/slow"):
                time.sleep(3)
            body = routes.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield base, routes, requests
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """An empty cache root, no data folder, online."""
    monkeypatch.setenv("MASS_DPO_CACHE", str(tmp_path / "cache"))
    for var in ("MASS_DPO_DATA", "HF_HUB_OFFLINE", "MASS_DPO_OFFLINE", movielens.URL_ENV):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "cache"


def _files(folder):
    """The files under ``folder`` but lock files (the download's lock may stay; it holds no data)."""
    files = folder.rglob("*") if folder.exists() else []
    return sorted(p for p in files if p.is_file() and ".locks" not in p.relative_to(folder).parts)


def test_checksums_are_those_of_the_release(release):
    for name, digest in movielens.SHA256.items():
        assert hashlib.sha256((release / name).read_bytes()).hexdigest() == digest


def test_download_on_first_use_gives_the_pools_of_the_shared_folder(cache, server, release, monkeypatch, shared_data):
    base, routes, requests = server
    routes["/ml-100k.zip"] = _zip(release)
    monkeypatch.setenv(movielens.URL_ENV, base + "/ml-100k.zip")
    assert locate("movielens", "test", "samples") == cache_dir()
    assert requests == ["/ml-100k.zip"]
    target = cache_dir() / "movielens" / "ml-100k"
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in release.iterdir())
    assert not [p for p in target.parent.iterdir() if p.name != "ml-100k"]  # no temporary folder left
    downloaded = load_benchmark("movielens", "test", data_dir="samples").to_list()
    assert downloaded == load_benchmark("movielens", "test", data_dir=shared_data).to_list()
    assert load_benchmark("movielens", "valid")["id"] == load_benchmark("movielens", "valid", data_dir=shared_data)["id"]
    assert requests == ["/ml-100k.zip"]  # cached: no second download


def test_wrong_checksum_caches_nothing(cache, server, release, monkeypatch):
    base, routes, requests = server
    routes["/ml-100k.zip"] = _zip(release, edit=lambda name, data: data + b"\n" if name == "u.item" else data)
    monkeypatch.setenv(movielens.URL_ENV, base + "/ml-100k.zip")
    with pytest.raises(FileNotFoundError) as err:
        locate("movielens", "train", "samples")
    msg = str(err.value)
    assert "checksum mismatch for ml-100k/u.item" in msg and "MASS_DPO_DATA" in msg and base in msg
    assert "\n" not in msg
    assert requests == ["/ml-100k.zip"] and _files(cache) == []


def test_parallel_jobs_over_one_cache_download_once(cache, server, release):
    """Two processes ask for MovieLens at once (as ranks or cluster jobs over one cache do): one downloads (a slow
    server, 3 s), the other waits for its lock and reads its copy: one request, two identical answers."""
    base, routes, requests = server
    routes["/slow-ml-100k.zip"] = _zip(release)
    env = {**os.environ, movielens.URL_ENV: base + "/slow-ml-100k.zip"}
    code = "from mass_dpo.data import locate; print(locate('movielens', 'train', 'samples'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert [out.strip() for out, _ in results] == [str(cache_dir())] * 2
    assert requests == ["/slow-ml-100k.zip"]
    target = cache_dir() / "movielens" / "ml-100k"
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in release.iterdir())


@pytest.mark.parametrize("route", ["/missing.zip", "/not-a-zip", "/slow"])
def test_failed_download_is_one_line_and_caches_nothing(cache, server, route):
    base, routes, requests = server
    routes["/not-a-zip"] = b"<html>not a zip</html>"
    routes["/slow"] = b"late"
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="MASS_DPO_DATA") as err:
        movielens.download(cache_dir(), url=base + route, timeout=0.5)
    assert time.monotonic() - start < 2.5  # the short timeout, not the 3 s the server takes
    assert "download failed" in str(err.value) and "\n" not in str(err.value)
    assert requests == [route] and _files(cache) == []


@pytest.mark.parametrize("flag", ["MASS_DPO_OFFLINE"])
def test_offline_message_and_no_connection(cache, server, monkeypatch, flag):
    base, routes, requests = server
    monkeypatch.setenv(movielens.URL_ENV, base + "/ml-100k.zip")
    monkeypatch.setenv(flag, "1")
    for where in ("samples", None):
        with pytest.raises(FileNotFoundError) as err:
            locate("movielens", "test", where)
        msg = str(err.value)
        assert "\n" not in msg and "MASS_DPO_DATA" in msg and base + "/ml-100k.zip" in msg
        assert f"offline ({flag}=1)" in msg
    assert requests == [] and _files(cache) == []


def test_a_data_folder_wins_and_an_explicit_folder_never_downloads(cache, server, monkeypatch, tmp_path, shared_data):
    base, routes, requests = server
    monkeypatch.setenv(movielens.URL_ENV, base + "/ml-100k.zip")
    monkeypatch.setenv("MASS_DPO_DATA", str(shared_data))
    assert locate("movielens", "test", "samples") == shared_data
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="u.data"):
        locate("movielens", "test", empty)
    assert requests == [] and _files(cache) == []


def test_the_hubs_offline_switch_does_not_stop_the_grouplens_download(cache, server, release, monkeypatch):
    base, routes, requests = server
    routes["/ml-100k.zip"] = _zip(release)
    monkeypatch.setenv(movielens.URL_ENV, base + "/ml-100k.zip")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what `mass-dpo reproduce` sets for its offline profiles
    assert locate("movielens", "test", "samples") == cache_dir() and requests == ["/ml-100k.zip"]


def test_reproduce_downloads_movielens_before_its_notebooks(cache, server, release, monkeypatch, tmp_path):
    """`mass-dpo reproduce`'s own path (default cpu profile, the hub switched off by it): the data step downloads
    MovieLens from the (local) GroupLens URL before any notebook runs, and says where every dataset comes from."""
    import json

    from mass_dpo import reproduce

    base, routes, requests = server
    routes["/ml-100k.zip"] = _zip(release)
    monkeypatch.setenv(movielens.URL_ENV, base + "/ml-100k.zip")
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    cell = {"cell_type": "code", "execution_count": None, "id": "p1", "metadata": {"tags": ["parameters"]},
            "outputs": [], "source": ["profile = None\n", "out_dir = None\n"]}
    nb = {"cells": [cell], "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                       "language": "python"}}, "nbformat": 4, "nbformat_minor": 5}
    (notebooks / "table2.ipynb").write_text(json.dumps(nb))  # the cpu profile's table2: lastfm and movielens
    lines = []
    report = reproduce.reproduce("cpu", ["table2"], out_dir=tmp_path / "out", notebooks_dir=notebooks, echo=lines.append)
    assert not report.failed
    assert requests == ["/ml-100k.zip"] and (cache_dir() / "movielens" / "ml-100k" / "u.data").is_file()
    assert f"data movielens: {cache_dir()}" in lines and any(line.startswith("data lastfm: ") for line in lines)
