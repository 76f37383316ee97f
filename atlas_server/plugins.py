"""The plugin host: discovers plugins, collects what they register, and lists them.

What it does: creates the pluggy manager for the "atlas" hooks, loads every entry point
of the `atlas` group (the built-ins in `plugins/` included: they are registered in
pyproject.toml like any third party's), reports a plugin that fails to import by name
and keeps loading the others (`strict=True` makes that fatal), refuses misspelled hooks
(`check_pending`), and calls the register hooks to fill four registries — retrievers,
rerankers, metrics, vector stores — rejecting a duplicate name with an error naming both
plugins. A plugin whose register hook raises is reported by name and left out, with
everything it registered, like one that fails to import. Plugins named in `disable`
(`ATLAS_DISABLE_PLUGINS`, and a server config's `[plugins] disable`) are not imported
and are listed as disabled, so another plugin may register the names they would have;
a name no installed plugin has is refused, as a misspelled hook is.
`describe()` is what `atlas plugins` and `GET /v1/plugins` show.
What it does not do: build retrievers (factories run lazily, see `rag/pipeline.py`).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from . import hookspecs

log = logging.getLogger("atlas.plugins")
GROUP = "atlas"
KINDS = ("retrievers", "rerankers", "metrics", "vector_stores")
DISABLE_ENV = "ATLAS_DISABLE_PLUGINS"  # comma-separated plugin names, for every command


class PluginError(Exception):
    """A plugin that cannot be loaded or that broke a rule of the plugin API."""


class _Duplicate(PluginError):
    """Two plugins registered one name (always fatal: see PluginHost.collect)."""


@dataclass
class PluginInfo:
    name: str
    module: str
    distribution: str | None
    version: str | None
    registered: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    error: str | None = None
    disabled: bool = False


class PluginHost:
    """`strict`: a plugin that fails to load or register is fatal, not left out.
    `diagnose` (`atlas plugins`): the problems that are otherwise fatal whatever `strict`
    says (a misspelled hook, two plugins claiming one name) are each recorded on the
    plugin at fault, which is left out, and listed in `problems`, so the tool that
    diagnoses an installation can show all of it rather than stop at the first.
    `disable`: plugin names (entry-point names) that are not loaded (`disabled_names()`)."""

    def __init__(
        self,
        strict: bool = False,
        discover: bool = True,
        diagnose: bool = False,
        disable: Iterable[str] = (),
    ) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.disable = sorted(set(disable))
        for name in self.disable:  # pluggy then refuses to register them, by any path
            self.pm.set_blocked(name)
        self.strict, self.diagnose = strict, diagnose
        self.problems: list[str] = []  # diagnose: what would have stopped a command
        self.plugins: dict[str, PluginInfo] = {}
        self.retrievers: dict[str, Callable[..., Any]] = {}
        self.rerankers: dict[str, Callable[..., Any]] = {}
        self.metrics: dict[str, Callable[..., Any]] = {}
        self.vector_stores: dict[str, Callable[..., Any]] = {}
        self._owner: dict[tuple[str, str], str] = {}
        if discover:
            self.load_entry_points()
        self.collect()

    # --- discovery ----------------------------------------------------------------------
    def load_entry_points(self) -> None:
        found = sorted(entry_points(group=GROUP), key=lambda e: e.name)
        for ep in found:
            if ep.name in self.plugins:
                continue  # the same plugin installed twice (e.g. editable + site): first wins
            if ep.name in self.disable:  # listed, never imported: its import may be the problem
                dist = getattr(ep, "dist", None)
                self.plugins[ep.name] = PluginInfo(
                    ep.name, ep.value, dist.name if dist else None,
                    dist.version if dist else None, disabled=True,
                )  # fmt: skip
                continue
            self._load(ep)
        unknown = sorted(set(self.disable) - {ep.name for ep in found})
        if unknown:
            # A misspelt name would leave the plugin on without a word.
            message = (
                f"cannot disable {', '.join(map(repr, unknown))} ([plugins] disable or "
                f"{DISABLE_ENV}): no installed plugin has that name; installed: "
                f"{', '.join(sorted({ep.name for ep in found})) or 'none'} (see `atlas plugins`)"
            )
            if not self.diagnose:
                raise PluginError(message)
            self.problems.append(message)

    def _load(self, ep: EntryPoint) -> None:
        dist = getattr(ep, "dist", None)
        info = PluginInfo(
            ep.name, ep.value, dist.name if dist else None, dist.version if dist else None
        )
        self.plugins[ep.name] = info
        try:
            module = ep.load()
            self.pm.register(module, name=ep.name)
        except Exception as e:
            info.error = f"{type(e).__name__}: {_one_line(e)}"
            message = f"plugin {ep.name!r} ({ep.value}) failed to load: {info.error}"
            if self.strict:
                raise PluginError(message) from e
            log.error(message)

    def register(self, plugin: object, name: str, version: str | None = None) -> None:
        """Add a plugin object directly (tests, applications embedding Atlas); one whose
        name is disabled is left out, as its entry point would be."""
        try:
            registered = self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as e:
            raise PluginError(f"plugin {name!r} cannot be registered: {_one_line(e)}") from e
        if registered is None:  # a disabled name: pluggy blocks it (set_blocked)
            return
        self.plugins[name] = PluginInfo(
            name, getattr(plugin, "__name__", type(plugin).__name__), None, version
        )
        self.collect()

    # --- registration -------------------------------------------------------------------
    def collect(self) -> None:
        """Check hook names, then call every register hook, plugin by plugin."""
        hooks = {f"atlas_register_{kind}" for kind in KINDS}
        while True:
            try:
                self.pm.check_pending()
                break
            except pluggy.PluginValidationError as e:
                name = self.pm.get_name(e.plugin) or repr(e.plugin)
                # pluggy names the plugin by its object's repr ("<module ...>"): by name here
                hook = re.search(r"unknown hook '([^']+)'", str(e))
                message = (
                    f"plugin {name!r} defines {hook[1]}, which is no Atlas hook (misspelled?);"
                    f" the hooks are {', '.join(sorted(hooks))}"
                    if hook
                    else f"plugin {name!r} cannot be used: {_one_line(e)}"
                )
                self._refuse(name, message, e)
        for plugin_name, plugin in self.pm.list_name_plugin():
            # check_pending sees only @hookimpl functions; the host also calls undecorated
            # ones by name, so an undecorated misspelling would register nothing silently.
            stray = sorted(
                attr for attr in dir(plugin)
                if attr.startswith("atlas_register") and attr not in hooks
                and callable(getattr(plugin, attr, None))
            )  # fmt: skip
            if stray:
                self._refuse(
                    plugin_name,
                    f"plugin {plugin_name!r} defines {', '.join(stray)}, which is no Atlas "
                    f"hook (misspelled?); the hooks are {', '.join(sorted(hooks))}",
                )
        for registry in (self.retrievers, self.rerankers, self.metrics, self.vector_stores):
            registry.clear()
        self._owner.clear()
        for info in self.plugins.values():
            info.registered = {k: [] for k in KINDS}
        for plugin_name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            try:
                for kind in KINDS:
                    impl = getattr(plugin, f"atlas_register_{kind}", None)
                    if impl is not None:
                        self._call(plugin_name, kind, impl)
            except _Duplicate as e:
                # Two plugins claim one name: which to keep is the user's choice.
                if not self.diagnose:
                    raise
                self._skip(plugin_name, e, quiet=True)
                self.problems.append(str(e))
            except Exception as e:
                self._skip(plugin_name, e)

    def _refuse(self, plugin_name: str, message: str, cause: Exception | None = None) -> None:
        """A plugin that breaks a rule of the API: fatal, or (diagnose) left out, its
        problem recorded."""
        if not self.diagnose:
            raise PluginError(message) from cause
        self.problems.append(message)
        self.pm.unregister(name=plugin_name)
        info = self.plugins.get(plugin_name)
        if info is not None:
            info.error = message

    def _skip(self, plugin_name: str, error: Exception, quiet: bool = False) -> None:
        """Report a plugin whose register hook raised and drop what it registered, as a
        plugin that fails to import is reported and left out (fatal when strict).
        `quiet`: recorded on the plugin only (diagnose's own problems)."""
        for (kind, name), owner in list(self._owner.items()):
            if owner == plugin_name:
                del getattr(self, kind)[name], self._owner[(kind, name)]
        reason = f"{type(error).__name__}: {error}"
        message = f"plugin {plugin_name!r} failed to register: {reason}"
        info = self.plugins.get(plugin_name)
        if info is not None:
            info.registered = {k: [] for k in KINDS}
            info.error = str(error) if quiet else f"register hook failed: {reason}"
        if quiet:
            return
        if self.strict:
            raise PluginError(message) from error
        log.error(message)

    def _call(self, plugin_name: str, kind: str, impl: Callable) -> None:
        registry: dict[str, Callable] = getattr(self, kind)

        def register(name: str, factory: Callable[..., Any]) -> None:
            if not isinstance(name, str) or not name:
                raise PluginError(
                    f"plugin {plugin_name!r} registered a {kind[:-1].replace('_', ' ')} without a name"
                )
            if not callable(factory):
                raise PluginError(
                    f"plugin {plugin_name!r}: the factory of {kind[:-1].replace('_', ' ')} {name!r} is not callable"
                )
            if name in registry:
                other = self._owner[(kind, name)]
                raise _Duplicate(
                    f"{kind[:-1].replace('_', ' ')} {name!r} is registered by both plugin {other!r} "
                    f"and plugin {plugin_name!r}; uninstall one or rename it, or disable one "
                    f"([plugins] disable, {DISABLE_ENV})"
                )
            registry[name] = factory
            self._owner[(kind, name)] = plugin_name
            if plugin_name in self.plugins:
                self.plugins[plugin_name].registered[kind].append(name)

        impl(register=register)

    def owner(self, kind: str, name: str) -> str | None:
        return self._owner.get((kind, name))

    def disabled_hint(self) -> str:
        """What "no retriever named X" adds when plugins are disabled (X may be theirs)."""
        return f" (disabled plugins: {', '.join(self.disable)})" if self.disable else ""

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "name": p.name,
                "module": p.module,
                "distribution": p.distribution,
                "version": p.version,
                "registered": p.registered,
                "error": p.error,
                "disabled": p.disabled,
            }
            for p in sorted(self.plugins.values(), key=lambda p: p.name)
        ]


def disabled_names(configured: Iterable[str] = ()) -> list[str]:
    """The plugins not to load: those `ATLAS_DISABLE_PLUGINS` names (comma-separated) and
    `configured` (a server config's `[plugins] disable`)."""
    from_env = (n.strip() for n in os.environ.get(DISABLE_ENV, "").split(","))
    return sorted({*filter(None, from_env), *configured})


@functools.lru_cache(maxsize=1)
def get_plugin_host() -> PluginHost:
    """The process-wide host with every installed plugin loaded, but those
    `ATLAS_DISABLE_PLUGINS` names (built once)."""
    return PluginHost(disable=disabled_names())


def server_plugin_host(configured: Iterable[str]) -> PluginHost:
    """The host of a server whose config disables `configured`: the process-wide one when
    that adds nothing (the host every other caller in the process shares), else one of
    its own."""
    configured = list(configured)
    if not configured:
        return get_plugin_host()
    return PluginHost(disable=disabled_names(configured))


def _one_line(error: Exception) -> str:
    """The error's message on one line: pluggy's validation errors span three."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
