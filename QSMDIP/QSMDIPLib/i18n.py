"""The translation function ``_`` for the panel's texts, as Slicer's own Python modules use it.

Inside Slicer 5.6 and later this is ``slicer.i18n.tr``: it finds the translation context from the
calling file, so re-exporting it from here keeps each module's own context. slicer-core (the tests)
and older Slicer versions have no ``slicer.i18n``; there the texts stay in English.
"""
try:
    from slicer.i18n import tr as _
except ImportError:  # slicer-core, or Slicer before 5.6
    def _(text: str) -> str:
        return text

__all__ = ["_"]
