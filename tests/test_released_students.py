"""Released DD students through the pipeline: each release's sampling settings (t_list, split) reach the sample jobs,
and with those settings our sampler reproduces the recorded few-step sampling of the golden DD students loaded from
files in the released format."""
import pytest
import torch
from conftest import REPO, golden_dir

from dd.families.base import ReleasedStudent
from dd.families.llamagen import golden as golden_llamagen
from dd.families.llamagen.checkpoints import load_student as load_llamagen_student
from dd.families.llamagen.student import DDConfig
from dd.families.llamagen.teacher import LlamaGenTeacher
from dd.families.var import golden as golden_var
from dd.families.var.checkpoints import load_student as load_var_student
from dd.families.var.teacher import VARTeacher
from dd.golden.cases import load_golden
from dd.method.sample import dd_sample
from dd.method.student import nearest_code
from dd.pipeline import config as ddconfig
from dd.pipeline import plan as ddplan


def test_released_dd_config_passes_the_release_split_to_every_dd_sample_job():
    checked = ddconfig.load_config(REPO / "config" / "released_dd.yaml", base_dir=REPO)
    seen = 0
    for name, exp in checked["experiments"].items():
        plan = ddplan.plan(name, exp, REPO)
        student = ddconfig.released_students()[exp["teacher"]["released_student"]]
        for s in plan.sets.values():
            if s.method in ("dd", "dd-teacher"):
                args = " ".join(s.args)
                assert f"--released-student --split-step {student.split_step}" in args, (name, s.name, args)
                seen += 1
        assert plan.sets["dd-2step"].args[:3] == ["--steps", *map(str, student.timesteps)], plan.sets["dd-2step"].args
    assert seen >= 4
    # VAR-d16's release splits at scale 5 (0-based), LlamaGen-L's at token 130: paper-notation steps 6 and 131
    assert ddconfig.released_students()["dd_var_d16"].split_step == 6
    assert ddconfig.released_students()["dd_llamagen_l"].split_step == 131


def test_sample_refuses_a_released_student_without_its_split(tmp_path, capsys):
    from dd.__main__ import main as cli

    release = REPO / "releases" / "tiny"
    with pytest.raises(SystemExit, match="released DD student needs --split-step"):
        cli(["sample", "--family", "llamagen", "--tokenizer", str(release / "tiny_llamagen_tokenizer.safetensors"),
             "--model", str(release / "tiny_llamagen_ar.safetensors"), "--method", "dd", "--num", "2",
             "--student", str(tmp_path / "never-read.pt"), "--released-student", "--out", str(tmp_path / "s.npz")])


def _check_sampling(student, teacher, labels, noise, release: ReleasedStudent, ref_final, codebook):
    x, passes = dd_sample(student, teacher, labels, noise, list(release.timesteps), release.split_step)
    assert passes == len(release.t_list)
    torch.testing.assert_close(x, ref_final, atol=1e-4, rtol=0)
    split_begin = teacher.step_begin(release.split_step - 1)
    # the tokens before the split are codes: the same codes as recorded
    assert torch.equal(nearest_code(x[:, :split_begin], codebook), nearest_code(ref_final[:, :split_begin], codebook))


@torch.no_grad()
def test_llamagen_golden_student_in_released_format_reproduces_fewstep_sampling(tmp_path):
    folder = golden_dir("llamagen")
    dd_blob = load_golden(folder / "dd_tiny.pt")
    teacher = LlamaGenTeacher(golden_llamagen.build_from_golden(load_golden(folder / "vq_tiny.pt")),
                              golden_llamagen.build_from_golden(load_golden(folder / "gpt_tiny.pt"))).eval()
    # the released layout: weights under "ema", loaded non-strictly as the DD scripts do
    sd = {k: v.float() if v.is_floating_point() else v for k, v in dd_blob["state_dict"].items()}
    torch.save({"ema": sd, "args": None}, tmp_path / "llamagen-tiny.pt")
    config = DDConfig.from_model_args(golden_llamagen._model_args(dd_blob["config"]))
    student = load_llamagen_student(tmp_path / "llamagen-tiny.pt", config=config)
    s = dd_blob["config"]["sampling"]
    release = ReleasedStudent("gpt_tiny", tuple(s["t_list"]), s["split_t"])
    _check_sampling(student, teacher, torch.tensor(s["label_B"]), dd_blob["inputs"]["noise_BLC"], release,
                    dd_blob["outputs"]["sampling"]["final_x_BLC"], teacher.codebook)


@torch.no_grad()
def test_var_golden_student_in_released_format_reproduces_fewstep_sampling(tmp_path):
    folder = golden_dir("var")
    dd_blob = load_golden(folder / "dd_tiny_d2.pt")
    var_blob = load_golden(folder / "var_tiny_d2.pt")
    var = golden_var._build(golden_var.VAR, golden_var.var_config(var_blob["config"]), var_blob)
    teacher = VARTeacher(golden_var.find_tokenizer(folder, golden_var.var_config(var_blob["config"])), var).eval()
    # the released layout: a training state with the EMA weights under ["trainer"]["ema_parameters"]
    sd = {k: v.float() if v.is_floating_point() else v for k, v in dd_blob["state_dict"].items()}
    torch.save({"trainer": {"ema_parameters": sd, "var_wo_ddp": {}}, "epoch": 1}, tmp_path / "var-tiny.pth")
    student = load_var_student(tmp_path / "var-tiny.pth", config=golden_var.student_config(dd_blob["config"]))
    smp = dd_blob["inputs"]["sampling"]
    release = ReleasedStudent("var_tiny_d2", tuple(int(t) for t in smp["t_list"]), int(smp["loss_split_t"]))
    _check_sampling(student, teacher, smp["label_B"], smp["noise_BLCv"], release,
                    dd_blob["outputs"]["sampling"]["final_sequence"], teacher.codebook)
