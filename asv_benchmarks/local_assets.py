"""Make a published asv dashboard load its scripts and styles from its own folder.

asv's ``index.html`` loads jQuery, flot, stupidtable, blueimp-md5 and Bootstrap from public CDNs;
where those are unreachable (an air-gapped machine, a strict proxy, CI) the page shows only asv's
"external (JavaScript) dependencies failed to load" message. This script fetches the same
versions with the user's own npm (``npm pack``: the registry's tarballs, nothing installed,
nothing committed to this repository), copies the files the page needs into ``HTML/vendor/`` and
points the page's ``<script>`` and ``<link>`` tags at them. ``run.sh publish --local-assets``
runs it after ``asv publish``.

The tarballs are kept in ``asv_benchmarks/.asv/npm-cache/`` (git-ignored), so a later publish
needs no network. Each file's SHA-256 is printed; the CDN's ``integrity`` attributes are dropped
(npm ships flot unminified, so its bytes differ from the CDN's minified copy; same-origin files
need no subresource integrity).

    python asv_benchmarks/local_assets.py [--html .asv/html] [--cache .asv/npm-cache]
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: (the CDN address in asv 0.6's index.html, the npm package with the same release, the file in
#: its tarball, where it goes under vendor/). stupidtable 1.0.1 is not on npm: 1.1.3 is the
#: closest release there (same ``$.fn.stupidtable`` API, which asv's tables call).
ASSETS = (
    ("https://code.jquery.com/jquery-3.3.1.min.js", "jquery@3.3.1", "dist/jquery.min.js"),
    (
        "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.min.js",
        "flot@0.8.3",
        "jquery.flot.js",
    ),
    (
        "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.time.min.js",
        "flot@0.8.3",
        "jquery.flot.time.js",
    ),
    (
        "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.selection.min.js",
        "flot@0.8.3",
        "jquery.flot.selection.js",
    ),
    (
        "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.categories.min.js",
        "flot@0.8.3",
        "jquery.flot.categories.js",
    ),
    (
        "https://cdn.jsdelivr.net/npm/flot-orderbars@1.0.0/js/jquery.flot.orderBars.js",
        "flot-orderbars@1.0.0",
        "js/jquery.flot.orderBars.js",
    ),
    (
        "https://cdnjs.cloudflare.com/ajax/libs/stupidtable/1.0.1/stupidtable.min.js",
        "stupid-table-plugin@1.1.3",
        "stupidtable.min.js",
    ),
    (
        "https://cdnjs.cloudflare.com/ajax/libs/blueimp-md5/2.19.0/js/md5.min.js",
        "blueimp-md5@2.19.0",
        "js/md5.min.js",
    ),
    (
        "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/js/bootstrap.min.js",
        "bootstrap@3.1.1",
        "dist/js/bootstrap.min.js",
    ),
    (
        "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css",
        "bootstrap@3.1.1",
        "dist/css/bootstrap.min.css",
    ),
)
#: Files the stylesheets load relative to themselves (Bootstrap's ``../fonts/`` icons).
EXTRA_FILES = tuple(
    ("bootstrap@3.1.1", f"dist/fonts/glyphicons-halflings-regular.{ext}")
    for ext in ("eot", "svg", "ttf", "woff")
)

_TAG = re.compile(r"<(script|link)\b[^>]*?(?:src|href)=\"(https?://[^\"]+)\"[^>]*>")


class AssetError(RuntimeError):
    """The page or the packages are not what this script expects; the message says what."""


def vendor_path(package: str, member: str) -> str:
    """Where a package's file goes, relative to the html folder: vendor/NAME/FILE."""
    return f"vendor/{package.rsplit('@', 1)[0]}/{member}"


def fetch(package: str, cache: Path, npm: str = "npm") -> Path:
    """The npm tarball of ``package`` (``name@version``) in ``cache``, fetched by ``npm pack``
    when it is not there yet."""
    name, version = package.rsplit("@", 1)
    tarball = cache / f"{name.replace('/', '-').lstrip('@')}-{version}.tgz"
    if tarball.exists():
        return tarball
    if shutil.which(npm) is None:
        raise AssetError(
            f"{npm!r} was not found: local assets are fetched with npm from the npm registry "
            "(Debian: apt-get install npm)"
        )
    cache.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [npm, "pack", package, "--pack-destination", str(cache)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 or not tarball.exists():
        raise AssetError(f"npm pack {package} failed: {done.stderr.strip()[-500:]}")
    return tarball


def extract(tarball: Path, member: str, target: Path) -> str:
    """Copy ``package/<member>`` of an npm tarball to ``target``; its SHA-256."""
    with tarfile.open(tarball) as archive:
        source = archive.extractfile(f"package/{member}")
        if source is None:
            raise AssetError(f"{tarball.name} has no file {member}")
        content = source.read()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content)
    return hashlib.sha256(content).hexdigest()


def rewrite(page: str, local: dict[str, str]) -> str:
    """``page`` with each CDN ``<script>``/``<link>`` tag pointing at its local copy.

    Raises
    ------
    AssetError
        When the page loads an address that ``local`` doesn't cover (a new asv release with
        other dependencies: extend :data:`ASSETS`), or lacks one that it does.
    """
    unknown = sorted({url for _, url in _TAG.findall(page)} - set(local))
    if unknown:
        raise AssetError(f"the page loads addresses this script doesn't know: {unknown}")
    missing = sorted(url for url in local if url not in page)
    if missing:
        raise AssetError(f"the page no longer loads {missing}: check ASSETS against asv's page")

    def local_tag(match: re.Match) -> str:
        kind, url = match.group(1), match.group(2)
        if kind == "link":
            return f'<link rel="stylesheet" href="{local[url]}">'
        # Keep asv's failure hook: a missing file still shows asv's message, not a blank page.
        return f'<script src="{local[url]}" onerror="js_load_failure()">'

    return _TAG.sub(local_tag, page)


def make_local(html: Path, cache: Path, npm: str = "npm") -> list[tuple[str, str]]:
    """Copy the assets into ``html/vendor`` and rewrite ``html/index.html``.

    Returns
    -------
    list of (path, sha256)
        Each copied file, relative to ``html``.
    """
    index = html / "index.html"
    if not index.exists():
        raise AssetError(f"{index} does not exist: run asv publish (run.sh publish) first")
    copied = []
    local = {}
    for url, package, member in ASSETS:
        relative = vendor_path(package, member)
        digest = extract(fetch(package, cache, npm), member, html / relative)
        copied.append((relative, digest))
        local[url] = relative
    for package, member in EXTRA_FILES:
        relative = vendor_path(package, member)
        copied.append((relative, extract(fetch(package, cache, npm), member, html / relative)))
    index.write_text(rewrite(index.read_text(), local))
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=Path, default=HERE / ".asv" / "html")
    parser.add_argument("--cache", type=Path, default=HERE / ".asv" / "npm-cache")
    parser.add_argument("--npm", default="npm", help="the npm command (default: npm)")
    args = parser.parse_args(argv)
    try:
        copied = make_local(args.html, args.cache, args.npm)
    except AssetError as error:
        print(f"local_assets.py: error: {error}", file=sys.stderr)
        return 1
    for relative, digest in copied:
        print(f"{digest}  {relative}")
    print(f"{args.html / 'index.html'} now loads its {len(copied)} scripts, styles and fonts "
          f"from {args.html / 'vendor'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
