"""`clclm_jax.data.fetch` against a web server on 127.0.0.1 that serves the shared data folder: by its own
layout (--mirror) and at the upstream URLs' paths (GitHub raw, GroupLens' zip, made here from the shared files)."""

import hashlib
import http.server
import io
import socket
import threading
import zipfile

import pytest

from clclm_jax.data import __main__ as cli
from clclm_jax.data import fetch, paths


class Server:
  """Serves `routes` (URL path -> bytes) with HTTP Range support; logs (path, Range header) of every GET.
  `cut_once`: paths whose next response stops after half the body; `ignore_range`: answer Range with 200."""

  def __init__(self):
    self.routes, self.requests, self.cut_once, self.ignore_range = {}, [], set(), False
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):
        server.requests.append((self.path, self.headers.get("Range")))
        data = server.routes.get(self.path)
        if data is None:
          self.send_error(404)
          return
        start = 0
        rng = self.headers.get("Range")
        if rng and not server.ignore_range:
          start = int(rng.removeprefix("bytes=").rstrip("-"))
          if start >= len(data):
            self.send_error(416)
            return
          self.send_response(206)
          self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
          self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if self.path in server.cut_once:  # half the body, then the connection closes (HTTP/1.0)
          server.cut_once.discard(self.path)
          self.wfile.write(data[start:start + (len(data) - start) // 2])
          return
        self.wfile.write(data[start:])

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

  def gets(self, path: str) -> list[str | None]:
    """The Range headers of the requests for `path`, in order."""
    return [rng for p, rng in self.requests if p == path]


def movielens_zip(data_root) -> bytes:
  """An ml-100k.zip like GroupLens' (members under ml-100k/), from the shared files."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
    for f in sorted((data_root / "ml-100k").iterdir()):
      z.write(f, f"ml-100k/{f.name}")
  return buf.getvalue()


@pytest.fixture
def server(data_root, monkeypatch):
  s = Server()
  for rel in fetch.SHA256:  # --mirror layout
    s.routes[f"/data/{rel}"] = (data_root / rel).read_bytes()
  for rel, (repo, commit, path) in fetch.GITHUB.items():  # raw.githubusercontent.com's layout
    s.routes[f"/gh/{repo}/{commit}/{path}"] = (data_root / rel).read_bytes()
  s.routes["/ml-100k.zip"] = movielens_zip(data_root)
  monkeypatch.setattr(fetch, "GITHUB_RAW", f"{s.base}/gh")
  monkeypatch.setattr(fetch, "MOVIELENS_ZIP", f"{s.base}/ml-100k.zip")
  s.thread.start()
  yield s
  s.httpd.shutdown()
  s.httpd.server_close()


def assert_sums(out, groups):
  for rel in fetch.files_of(groups):
    assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == fetch.SHA256[rel], rel
  assert not [p for p in out.rglob("*") if p.name.endswith((".part", ".tmp", ".zip"))]


def one_line(e) -> str:
  text = str(e.value)
  assert "\n" not in text
  return text


def test_upstream_sources_then_nothing_again_then_a_corrupt_file(server, tmp_path):
  out = tmp_path / "data"
  done = fetch.fetch(list(fetch.GROUPS), out, progress=False)
  assert {rel for rel, how in done.items() if how == "extracted"} == {r for r in done if r.startswith("ml-100k/")}
  assert done["amazon-beauty-5core/item_titles.tsv"] == "derived"
  assert set(done.values()) == {"extracted", "derived", "downloaded"}
  assert_sums(out, fetch.GROUPS)
  assert server.gets("/ml-100k.zip") == [None]  # one zip for all of its members
  assert all(len(commit) == 40 for _, commit, _ in fetch.GITHUB.values())

  before = len(server.requests)
  assert set(fetch.fetch(list(fetch.GROUPS), out, progress=False).values()) == {"present"}
  assert len(server.requests) == before  # right sums: nothing downloaded

  bad = out / "tallrec" / "book" / "test.json"
  data = bytearray(bad.read_bytes())
  data[100] ^= 1
  bad.write_bytes(bytes(data))
  (out / "ml-100k" / "u.item").unlink()
  done = fetch.fetch(["book", "movie"], out, progress=False)
  assert done["tallrec/book/test.json"] == "downloaded" and done["ml-100k/u.item"] == "extracted"
  assert done["tallrec/book/valid.json"] == "present" and done["ml-100k/u.data"] == "present"
  assert len(server.requests) == before + 2  # the corrupt file and the zip, nothing else
  assert_sums(out, ["book", "movie"])


def test_mirror_layout(server, tmp_path):
  out = tmp_path / "data"
  done = fetch.fetch(["beauty", "book", "movie"], out, mirror=f"{server.base}/data/", progress=False)
  assert set(done.values()) == {"downloaded"}  # item_titles.tsv and ml-100k files come as they are
  assert_sums(out, ["beauty", "book", "movie"])
  assert server.gets("/data/ml-100k/u.data") == [None] and not server.gets("/ml-100k.zip")


def test_broken_connection_resumes_with_range(server, tmp_path):
  path = "/data/tallrec/book/test.json"
  server.cut_once.add(path)
  fetch.fetch(["book"], tmp_path, mirror=f"{server.base}/data", progress=False)
  assert server.gets(path) == [None, f"bytes={len(server.routes[path]) // 2}-"]
  assert_sums(tmp_path, ["book"])


@pytest.mark.parametrize("ignore_range", [False, True])
def test_partial_file_from_an_earlier_run(server, tmp_path, ignore_range):
  """A `.part` left by a killed run is continued; a server that ignores Range sends the whole file again."""
  path, rel = "/data/tallrec/book/valid.json", "tallrec/book/valid.json"
  server.ignore_range = ignore_range
  part = tmp_path / (rel + ".part")
  part.parent.mkdir(parents=True)
  part.write_bytes(server.routes[path][:1000])
  done = fetch.fetch(["book"], tmp_path, mirror=f"{server.base}/data", progress=False)
  assert done[rel] == "downloaded" and server.gets(path) == ["bytes=1000-"]
  assert_sums(tmp_path, ["book"])


def test_stale_partial_file_is_fetched_again_whole(server, tmp_path):
  rel = "tallrec/book/valid.json"
  (tmp_path / rel).parent.mkdir(parents=True)
  (tmp_path / (rel + ".part")).write_bytes(b"not the start of the file")
  fetch.fetch(["book"], tmp_path, mirror=f"{server.base}/data", progress=False)
  assert server.gets(f"/data/{rel}") == ["bytes=25-", None]
  assert_sums(tmp_path, ["book"])


def test_checksum_mismatch_removes_the_file(server, tmp_path, monkeypatch):
  rel = "tallrec/book/test.json"
  monkeypatch.setitem(fetch.SHA256, rel, "0" * 64)
  with pytest.raises(fetch.FetchError) as e:
    fetch.fetch(["book"], tmp_path, progress=False)
  text = one_line(e)
  assert str(tmp_path / rel) in text and "sha256" in text and "removed" in text
  assert not (tmp_path / rel).exists() and not (tmp_path / (rel + ".part")).exists()


def test_zip_member_mismatch(server, tmp_path, monkeypatch):
  monkeypatch.setitem(fetch.SHA256, "ml-100k/u.item", "0" * 64)
  with pytest.raises(fetch.FetchError) as e:
    fetch.fetch(["movie"], tmp_path, progress=False)
  assert "ml-100k/u.item" in one_line(e)
  assert not (tmp_path / "ml-100k" / "u.item").exists() and not (tmp_path / ".ml-100k.zip").exists()


def test_no_server(tmp_path):
  with socket.socket() as s:  # a port nothing listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  with pytest.raises(fetch.FetchError) as e:
    fetch.fetch(["book"], tmp_path, mirror=f"http://127.0.0.1:{port}", progress=False)
  text = one_line(e)
  assert f"http://127.0.0.1:{port}/tallrec/book/valid.json" in text and "CLCLM_DATA" in text


def test_missing_file_on_the_server(server, tmp_path):
  del server.routes["/data/tallrec/book/test.json"]
  with pytest.raises(fetch.FetchError) as e:
    fetch.fetch(["book"], tmp_path, mirror=f"{server.base}/data", progress=False)
  assert "404" in one_line(e) and "tallrec/book/test.json" in str(e.value)


@pytest.fixture
def no_data_root(tmp_path, monkeypatch):
  """CLCLM_DATA unset, no ../shared/data, the cache under tmp_path."""
  monkeypatch.delenv("CLCLM_DATA", raising=False)
  monkeypatch.setenv("CLCLM_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(paths, "shared_data", lambda: tmp_path / "no-shared-data")
  return tmp_path / "cache" / "data"


def test_ensure_data_fills_the_cache(server, no_data_root, capsys):
  with pytest.raises(FileNotFoundError, match="clclm_jax.data fetch"):
    paths.data_root()
  assert fetch.ensure_data(["book"], progress=False) == no_data_root
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and str(no_data_root) in lines[0]
  assert paths.data_root() == no_data_root
  assert_sums(no_data_root, ["book"])
  before = len(server.requests)
  assert fetch.ensure_data(["book"], progress=False) == no_data_root
  assert len(server.requests) == before and not capsys.readouterr().err


def test_ensure_data_partial_folder(data_root, tmp_path, monkeypatch):
  (tmp_path / "tallrec" / "book").mkdir(parents=True)
  (tmp_path / "tallrec" / "book" / "valid.json").write_bytes((data_root / "tallrec/book/valid.json").read_bytes())
  monkeypatch.setenv("CLCLM_DATA", str(tmp_path))
  with pytest.raises(fetch.FetchError) as e:
    fetch.ensure_data(["book"])
  text = one_line(e)
  assert "tallrec/book/test.json" in text and "valid.json" not in text and "--only book" in text
  monkeypatch.setenv("CLCLM_DATA", str(data_root))
  assert fetch.ensure_data(["book", "movie", "beauty", "instruct"]) == data_root


def test_cache_folder_follows_the_model_cache(tmp_path, monkeypatch):
  from clclm_jax.model import loading
  monkeypatch.setenv("CLCLM_CACHE", str(tmp_path))
  assert paths.cache_data() == loading.cache_root() / "data" == tmp_path / "data"
  monkeypatch.delenv("CLCLM_CACHE")
  assert paths.cache_data() == loading.cache_root() / "data"


def test_command_line(server, tmp_path, capsys):
  args = ["fetch", "--only", "book", "--out", str(tmp_path), "--quiet"]
  assert cli.main(args + ["--mirror", f"{server.base}/data"]) == 0
  assert capsys.readouterr().out.startswith("downloaded=2 ")
  assert cli.main(args + ["--mirror", f"{server.base}/data"]) == 0
  assert capsys.readouterr().out.startswith("present=2 ")
  (tmp_path / "tallrec/book/test.json").unlink()
  assert cli.main(args + ["--mirror", f"{server.base}/nothing"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and "CLCLM_DATA" in err
  with pytest.raises(SystemExit):
    cli.main(["fetch", "--only", "books"])
  assert "choose from movie,book,beauty,instruct" in capsys.readouterr().err


def test_fetch_errors_print_as_one_line_in_the_trainer():
  from clclm_jax.train import cli as train_cli
  assert issubclass(fetch.FetchError, train_cli.USER_ERRORS)


def test_ensure_data_reads_the_mirror_clclm_mirror_names(server, no_data_root, monkeypatch):
  monkeypatch.setenv("CLCLM_MIRROR", f"{server.base}/data")
  assert fetch.ensure_data(["book"], progress=False) == no_data_root
  assert_sums(no_data_root, ["book"])
  assert server.requests and all(path.startswith("/data/") for path, _ in server.requests)
