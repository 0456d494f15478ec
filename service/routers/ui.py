"""The dashboard: static pages under /ui that call the same /v1 API with the same API keys.

The pages are one HTML shell plus scripts and styles from service/static. They hold no data and
need no key: the browser keeps the key in sessionStorage and sends it as the Bearer header of
its /v1 requests, so the tenant rules are the API's own. A strict Content-Security-Policy (no
inline script, no other origin) limits what an escaping mistake could do.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse, RedirectResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Small files on the same host: revalidating costs little and a new release shows at once.
    "Cache-Control": "no-cache",
}
_MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
# The client-side routes; anything else under /ui is a 404 like any unknown path.
_PAGES = ("/ui", "/ui/signin", "/ui/jobs", "/ui/submit", "/ui/compare", "/ui/jobs/{job_id}")

router = APIRouter(include_in_schema=False)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/ui", status.HTTP_307_TEMPORARY_REDIRECT)


async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=SECURITY_HEADERS)


for _path in _PAGES:
    router.add_api_route(_path, page, methods=["GET"])


@router.get("/ui/assets/{name}")
async def asset(name: str) -> FileResponse:
    # Only the files shipped in service/static, by exact name: no path reaches elsewhere.
    media_type = _MEDIA_TYPES.get(Path(name).suffix)
    file = STATIC_DIR / name
    if media_type is None or "/" in name or name.startswith(".") or not file.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such asset")
    return FileResponse(file, media_type=media_type, headers=SECURITY_HEADERS)
