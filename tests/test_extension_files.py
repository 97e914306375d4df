"""The extension's files agree with each other: .ui widgets, parameter node, CMake lists, catalog entries.

These checks stand in for what only a Slicer build would otherwise reveal: a widget the code reaches
that the .ui file lacks, a Python file missing from the package CMake installs, a parameter bound to
a widget the parameter node wrapper cannot connect, an icon of the wrong size. The CMake files are
evaluated by CMake itself with Slicer's macros replaced by recorders.
"""
import ast
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_DIR = os.path.join(ROOT, "QSMDIP")
MODULE_FILE = os.path.join(MODULE_DIR, "QSMDIP.py")
UI_FILE = os.path.join(MODULE_DIR, "Resources", "UI", "QSMDIP.ui")
ICON_FILE = os.path.join(MODULE_DIR, "Resources", "Icons", "QSMDIP.png")
LIBRARY_DIR = os.path.join(MODULE_DIR, "qsmdip")
LOGIC_DIR = os.path.join(MODULE_DIR, "QSMDIPLib")
needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


def module_tree() -> ast.Module:
    with open(MODULE_FILE, encoding="utf-8") as handle:
        return ast.parse(handle.read())


def ui_widgets() -> dict:
    """name -> <widget> element of every widget in the .ui file."""
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def widget_property(widget, name):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return prop[0].text
    return None


def python_files(folder):
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


# -- module file and .ui --------------------------------------------------------------------------------
def test_module_file_holds_only_module_widget_logic_test_and_parameter_node():
    classes = [n.name for n in module_tree().body if isinstance(n, ast.ClassDef)]
    assert sorted(classes) == sorted(["QSMDIP", "QSMDIPParameterNode", "QSMDIPWidget", "QSMDIPLogic", "QSMDIPTest"])


def test_every_widget_the_module_reaches_exists_in_the_ui_file():
    reached = {node.attr for node in ast.walk(module_tree())
               if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
               and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    assert len(reached) > 10
    missing = sorted(reached - set(ui_widgets()))
    assert missing == [], f"self.ui.X names missing from QSMDIP.ui: {missing}"


def parameter_fields() -> dict:
    """field name -> (type name, Choice list or None, (min, max) or None, default) of QSMDIPParameterNode."""
    cls = next(n for n in module_tree().body if isinstance(n, ast.ClassDef) and n.name == "QSMDIPParameterNode")
    fields = {}
    for item in cls.body:
        if not isinstance(item, ast.AnnAssign):
            continue
        annotation, choices, limits = item.annotation, None, None
        if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", "") == "Annotated":
            parts = annotation.slice.elts
            annotation = parts[0]
            for extra in parts[1:]:
                name = getattr(extra.func, "id", "")
                if name == "Choice":
                    choices = ast.literal_eval(extra.args[0])
                elif name == "WithinRange":
                    limits = tuple(ast.literal_eval(a) for a in extra.args)
        default = ast.literal_eval(item.value) if item.value is not None else None
        fields[item.target.id] = (annotation.id, choices, limits, default)
    return fields


def test_parameter_node_fields_bind_to_widgets_the_wrapper_can_connect():
    # parameterNodeWrapper's connectors match the exact widget class for each type.
    connector = {"int": "QSpinBox", "float": "QDoubleSpinBox", "str": "QComboBox"}
    fields = parameter_fields()
    bound = {}
    for name, widget in ui_widgets().items():
        parameter = widget_property(widget, "SlicerParameterName")
        if parameter is not None:
            assert parameter not in bound, f"{parameter} is bound to two widgets"
            bound[parameter] = widget
    assert sorted(bound) == sorted(fields)
    for name, (type_name, choices, limits, default) in fields.items():
        widget = bound[name]
        cls = widget.get("class")
        if type_name.startswith("vtkMRML"):
            assert cls == "qMRMLNodeComboBox", name
            continue
        assert cls == connector[type_name], f"{name}: {type_name} needs a {connector[type_name]}, not {cls}"
        if type_name == "str":
            assert choices is not None, f"{name}: a QComboBox needs a Choice annotation"
            items = [item.find("property").find("string").text for item in widget.findall("item")]
            assert items == choices and default in choices, name
        else:
            assert limits is not None and limits[0] <= default <= limits[1], name
            low, high = float(widget_property(widget, "minimum") or 0), float(widget_property(widget, "maximum"))
            assert (low, high) == pytest.approx(limits), f"{name}: .ui range differs from WithinRange"
            assert float(widget_property(widget, "value") or 0) == pytest.approx(default), name


def parameter_annotations() -> dict:
    """field name -> names of the Annotated extras (Choice, WithinRange, ...) of QSMDIPParameterNode."""
    cls = next(n for n in module_tree().body if isinstance(n, ast.ClassDef) and n.name == "QSMDIPParameterNode")
    extras = {}
    for item in cls.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.annotation, ast.Subscript):
            extras[item.target.id] = [getattr(e.func, "id", "") for e in item.annotation.slice.elts[1:]]
    return extras


def test_float_decimals_come_from_the_ui_not_from_annotations():
    # A Decimals annotation on a field bound to a QDoubleSpinBox is only logged as "Unused annotations"
    # by the parameter node wrapper at every start; the .ui sets the decimals instead.
    assert all("Decimals" not in extras for extras in parameter_annotations().values())
    floats = [name for name, (type_name, *_) in parameter_fields().items() if type_name == "float"]
    bound = {widget_property(w, "SlicerParameterName"): w for w in ui_widgets().values()}
    for name in floats:
        decimals = widget_property(bound[name], "decimals")
        assert decimals is not None, f"{name}: set the decimals in the .ui"
        low = parameter_fields()[name][2][0]
        assert round(low, int(decimals)) == low, f"{name}: {decimals} decimals cannot show the minimum {low}"


def string_constants(node) -> list:
    return [n for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.strip()]


def test_user_visible_texts_are_translatable():
    tree = module_tree()
    imports = {(n.module, a.name, a.asname) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert ("slicer.i18n", "tr", "_") in imports and ("slicer.i18n", "translate", None) in imports
    wrapped = {id(c) for call in ast.walk(tree) if isinstance(call, ast.Call)
               and getattr(call.func, "id", "") in ("_", "translate") for c in string_constants(call)}
    dialogs = ("errorDisplay", "infoDisplay", "confirmOkCancelDisplay", "tryWithErrorDisplay", "getExistingDirectory")
    bare = []
    for node in ast.walk(tree):
        texts = []
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr in ("text", "title", "helpText")
                                                for t in node.targets):
            texts = string_constants(node.value)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in dialogs:
            texts = [c for arg in node.args for c in string_constants(arg)]
        bare += [c.value for c in texts if id(c) not in wrapped]
    assert bare == [], f"texts shown to the user without _(): {bare}"
    module_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "QSMDIP")
    help_text = next(n for n in ast.walk(module_class) if isinstance(n, ast.Assign)
                     and getattr(n.targets[0], "attr", "") == "helpText")
    assert '<a href="{url}">' in ast.unparse(help_text.value)


def test_help_text_links_to_the_documentation_on_the_extension_homepage():
    namespace = {}
    for node in module_tree().body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "DOCUMENTATION_URL":
            namespace["url"] = ast.literal_eval(node.value)
    with open(os.path.join(ROOT, "CMakeLists.txt"), encoding="utf-8") as handle:
        homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"]+)"\)', handle.read()).group(1)
    assert namespace["url"].startswith(homepage)


def test_every_subprocess_from_the_slicer_side_hides_its_console_window():
    # On Windows a child of a GUI program opens a console window unless told not to (CREATE_NO_WINDOW).
    files = list(python_files(LOGIC_DIR)) + [MODULE_FILE]
    calls = []
    for path in files:
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    getattr(node.func.value, "id", "") == "subprocess":
                options = [k.value for k in node.keywords if k.arg is None]
                uses = any(isinstance(o, ast.Call) and getattr(o.func, "id", "") == "popen_options" for o in options)
                calls.append((os.path.basename(path), node.func.attr, uses))
    assert calls and all(uses for _, _, uses in calls), calls


def test_example_selection_names_parameter_node_fields():
    sys.path.insert(0, MODULE_DIR)
    from QSMDIPLib.example import ExampleNodes, panel_selection

    selection = panel_selection(ExampleNodes(field=object(), mask=object(), chi=object()))
    fields = parameter_fields()
    assert set(selection) <= set(fields)
    assert selection["fieldUnits"] in fields["fieldUnits"][1]


def test_module_uses_only_declared_parameters_and_choices_the_logic_knows():
    from QSMDIPLib.job import DEVICES, METHODS, UNITS

    fields = parameter_fields()
    assert fields["method"][1] == list(METHODS) and fields["fieldUnits"][1] == list(UNITS)
    assert fields["device"][1] == list(DEVICES)
    wrapper_api = {"connectGui", "disconnectGui"}
    used = set()
    for node in ast.walk(module_tree()):
        if isinstance(node, ast.Attribute):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id == "p":
                used.add(node.attr)
            elif isinstance(owner, ast.Attribute) and owner.attr == "_parameterNode":
                used.add(node.attr)
    assert used and sorted(used - set(fields) - wrapper_api) == []


def test_panel_dip_defaults_are_the_library_default_preset():
    """The panel must not quietly run other settings than the ones the README's figures were measured with."""
    from qsmdip.solvers.dip import PRESETS

    fields = parameter_fields()
    preset = PRESETS["default"]
    assert fields["iterations"][3] == preset.iterations
    assert fields["learningRate"][3] == pytest.approx(preset.learning_rate)
    assert fields["width"][3] == preset.width
    assert fields["seed"][3] == preset.seed


def test_ui_layout_scene_connections_and_advanced_section():
    root = ET.parse(UI_FILE).getroot()
    widgets = ui_widgets()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "QSMDIP"
    declared = {c.find("class").text for c in root.iter("customwidget")}
    used = {w.get("class") for w in widgets.values()}
    assert {c for c in used if c.startswith(("q", "ctk"))} <= declared
    combos = {n for n, w in widgets.items() if w.get("class") == "qMRMLNodeComboBox"}
    wired = {c.find("receiver").text for c in root.iter("connection")
             if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert combos == wired == {"fieldVolumeSelector", "maskVolumeSelector", "referenceVolumeSelector",
                               "magnitudeVolumeSelector", "outputVolumeSelector"}
    for optional in ("referenceVolumeSelector", "magnitudeVolumeSelector"):   # may be left empty
        assert widget_property(widgets[optional], "noneEnabled") == "true", optional
        assert widget_property(widgets[optional], "noneDisplay") == "None (optional)", optional
    inputs = {w.get("name") for w in widgets["inputsCollapsibleButton"].iter("widget")}
    assert {"magnitudeLabel", "magnitudeVolumeSelector"} <= inputs
    assert widget_property(widgets["magnitudeLabel"], "text") == "Magnitude (optional):"
    advanced = widgets["advancedCollapsibleButton"]
    assert advanced.get("class") == "ctkCollapsibleButton" and widget_property(advanced, "collapsed") == "true"
    inside = {w.get("name") for w in advanced.iter("widget")}
    assert {"iterationsSpinBox", "learningRateSpinBox", "widthSpinBox", "updateIntervalSpinBox", "seedSpinBox",
            "deviceComboBox"} <= inside
    assert widget_property(widgets["maskVolumeSelector"], "showChildNodeTypes") == "true"      # label maps too
    assert widget_property(widgets["fieldVolumeSelector"], "showChildNodeTypes") == "false"
    assert widgets["metricsTable"].get("class") == "QTableWidget"


def test_icon_is_a_128_pixel_png():
    with open(ICON_FILE, "rb") as handle:
        head = handle.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    assert struct.unpack(">II", head[16:24]) == (128, 128)


# -- CMake ----------------------------------------------------------------------------------------------
RECORDER = r"""
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(M "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  file(APPEND "${OUT}" "NAME=${M_NAME}\nGENERIC=${M_WITH_GENERIC_TESTS}\n")
  foreach(item ${M_SCRIPTS})
    file(APPEND "${OUT}" "SCRIPT=${item}\n")
  endforeach()
  foreach(item ${M_RESOURCES})
    file(APPEND "${OUT}" "RESOURCE=${item}\n")
  endforeach()
endfunction()
function(slicer_add_python_unittest)
  file(APPEND "${OUT}" "UNITTEST=${ARGN}\n")
endfunction()
function(add_subdirectory dir)
  file(APPEND "${OUT}" "SUBDIR=${dir}\n")
endfunction()
function(project name)
  file(APPEND "${OUT}" "PROJECT=${name}\n")
endfunction()
function(find_package name)
  file(APPEND "${OUT}" "FIND=${ARGV}\n")
endfunction()
"""


def run_cmake(tmp_path, cmake_file, variables):
    """Evaluate ``cmake_file`` in script mode with Slicer's macros recorded; return the records."""
    out = tmp_path / "records.txt"
    empty = tmp_path / "empty.cmake"
    empty.write_text("")
    driver = tmp_path / "driver.cmake"
    settings = "".join(f'set({k} "{v}")\n' for k, v in variables.items())
    for name in ("Slicer_USE_FILE", "Slicer_EXTENSION_GENERATE_CONFIG", "Slicer_EXTENSION_CPACK"):
        settings += f'set({name} "{empty.as_posix()}")\n'
    tail = "\n".join(f'file(APPEND "${{OUT}}" "VAR {k}=${{{k}}}\\n")' for k in variables.get("_REPORT", "").split(";") if k)
    driver.write_text(RECORDER + settings + f'include("{cmake_file}")\n' + tail + "\n")
    subprocess.run(["cmake", f"-DOUT={out.as_posix()}", "-P", str(driver)], check=True, capture_output=True, text=True)
    records = {}
    for line in out.read_text().splitlines():
        key, _, value = line.partition("=")
        records.setdefault(key, []).append(value)
    return records


@needs_cmake
def test_module_cmake_lists_every_python_file_and_resource(tmp_path):
    records = run_cmake(tmp_path, os.path.join(MODULE_DIR, "CMakeLists.txt").replace(os.sep, "/"),
                        {"CMAKE_CURRENT_SOURCE_DIR": MODULE_DIR.replace(os.sep, "/"), "BUILD_TESTING": "ON"})
    assert records["NAME"] == ["QSMDIP"] and records["GENERIC"] == ["TRUE"]
    assert records["UNITTEST"] == ["SCRIPT;QSMDIP.py"] and records["SUBDIR"] == ["Testing"]
    listed = set(records["SCRIPT"])
    assert len(listed) == len(records["SCRIPT"]), "a script is listed twice"
    on_disk = {os.path.relpath(p, MODULE_DIR).replace(os.sep, "/")
               for p in python_files(MODULE_DIR) if not os.path.relpath(p, MODULE_DIR).startswith("Testing")}
    assert sorted(on_disk - listed) == [], "Python files the extension would not install"
    assert sorted(listed - on_disk) == [], "listed files that do not exist"
    assert any(p.startswith("qsmdip/solvers/") for p in listed) and "qsmdip/worker.py" in listed
    resources = {os.path.relpath(os.path.join(d, f), MODULE_DIR).replace(os.sep, "/")
                 for d, _, files in os.walk(os.path.join(MODULE_DIR, "Resources")) for f in files}
    assert set(records["RESOURCE"]) == resources


@needs_cmake
def test_extension_cmake_matches_the_catalog_entries(tmp_path):
    keys = ["EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
            "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"]
    records = run_cmake(tmp_path, os.path.join(ROOT, "CMakeLists.txt").replace(os.sep, "/"),
                        {"CMAKE_CURRENT_SOURCE_DIR": ROOT.replace(os.sep, "/"), "_REPORT": ";".join(keys)})
    assert records["PROJECT"] == ["QSMDIP"] and records["SUBDIR"] == ["QSMDIP"]
    assert records["FIND"] == ["Slicer;REQUIRED"]
    values = {key[len("VAR "):]: value[0] for key, value in records.items() if key.startswith("VAR ")}
    assert values["EXTENSION_CATEGORY"] == "Quantification"
    assert values["EXTENSION_DEPENDS"] == "PyTorch"
    assert values["EXTENSION_CONTRIBUTORS"] == "QSMDIP developers"
    assert values["EXTENSION_ICONURL"].endswith("QSMDIP/Resources/Icons/QSMDIP.png")
    assert all(values[k] for k in keys)

    s4ext = {}
    with open(os.path.join(ROOT, "QSMDIP.s4ext"), encoding="utf-8") as handle:
        for line in handle:
            if line.strip() and not line.startswith("#"):
                key, _, value = line.strip().partition(" ")
                s4ext[key] = value
    assert s4ext["category"] == values["EXTENSION_CATEGORY"] and s4ext["depends"] == values["EXTENSION_DEPENDS"]
    assert s4ext["homepage"] == values["EXTENSION_HOMEPAGE"] and s4ext["iconurl"] == values["EXTENSION_ICONURL"]
    assert s4ext["description"] == values["EXTENSION_DESCRIPTION"] and s4ext["scm"] == "git"
    with open(os.path.join(ROOT, "QSMDIP.json"), encoding="utf-8") as handle:
        entry = json.load(handle)
    assert entry["category"] == values["EXTENSION_CATEGORY"] and entry["build_dependencies"] == ["PyTorch"]
    assert s4ext["scmurl"] in (entry["scm_url"], entry["scm_url"] + ".git")
    assert entry["scm_url"] == values["EXTENSION_HOMEPAGE"] and entry["scm_revision"] == s4ext["scmrevision"]


def test_catalog_entry_follows_the_extension_index_schema():
    # Slicer/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json: required keys, no others, types.
    with open(os.path.join(ROOT, "QSMDIP.json"), encoding="utf-8") as handle:
        entry = json.load(handle)
    allowed = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
               "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str, "enabled": bool,
               "tier": int}
    assert {"$schema", "category", "scm_url"} <= set(entry) <= set(allowed)
    assert all(isinstance(entry[k], allowed[k]) for k in entry)
    assert re.search(r"slicer-extension-catalog-entry-schema-v\d+\.\d+\.\d+\.json#$", entry["$schema"])
    assert entry.get("scm_type", "git") in ("git", "local") and 1 <= entry.get("tier", 1) <= 5
    assert all(isinstance(d, str) for d in entry["build_dependencies"])
    with open(os.path.join(ROOT, "LICENSE.txt"), encoding="utf-8") as handle:
        text = handle.read()
    assert "BSD 3-Clause" in text and "QSMDIP developers" in text


# -- layering -------------------------------------------------------------------------------------------
def imported_roots(path):
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_library_never_imports_slicer_qt_or_vtk():
    forbidden = {"slicer", "qt", "vtk", "ctk", "vtkmodules", "slicer_core", "PythonQt", "__main__"}
    files = list(python_files(LIBRARY_DIR))
    assert len(files) > 10
    offenders = {os.path.relpath(p, MODULE_DIR): sorted(imported_roots(p) & forbidden) for p in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_slicer_logic_never_imports_torch_or_qt():
    forbidden = {"torch", "qt", "ctk", "PythonQt", "__main__"}
    offenders = {os.path.relpath(p, MODULE_DIR): sorted(imported_roots(p) & forbidden) for p in python_files(LOGIC_DIR)}
    assert {k: v for k, v in offenders.items() if v} == {}
    module_imports = imported_roots(MODULE_FILE)
    assert "torch" not in module_imports


def test_slicer_process_stays_free_of_torch():
    # What the module imports in Slicer's own process (its logic and the metrics) must not load torch.
    code = ("import sys; import QSMDIPLib.session, QSMDIPLib.compare, QSMDIPLib.torch_check, QSMDIPLib.example, "
            "QSMDIPLib.dicom, qsmdip.dicom_export, qsmdip.metrics, qsmdip.errors; print('torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([MODULE_DIR, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "False"
