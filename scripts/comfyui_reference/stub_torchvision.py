# Minimal stand-ins for torchvision/torchaudio so ComfyUI's import chain loads; the SD1.5 txt2img
# nodes never call them (they are only used by Cascade/Cosmos/audio models). Any use raises.
import types, sys
class _Dummy:
    def __init__(self, name): self._name = name
    def __getattr__(self, a): return _Dummy(self._name + "." + a)
    def __call__(self, *a, **k): raise RuntimeError("stubbed: " + self._name + " called")
    def __mro_entries__(self, bases): return (object,)
def make(name):
    m = types.ModuleType(name); m.__path__ = []
    m.__getattr__ = lambda a: _Dummy(name + "." + a) if not a.startswith("__") else (_ for _ in ()).throw(AttributeError(a))
    return m
class _Finder:
    roots = ("torchvision", "torchaudio")
    def find_module(self, fullname, path=None): return None
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            import importlib.machinery as im
            return im.ModuleSpec(fullname, self)
        return None
    def create_module(self, spec): return make(spec.name)
    def exec_module(self, module): pass
sys.meta_path.insert(0, _Finder())
