r"""Export a language-model run of ours to a Hugging Face directory.

  python -m launch.export_hf --workdir=RUN --out=DIR [--step=N]

DIR (new or empty; never inside RUN) gets config.json, model.safetensors,
generation_config.json and, for the byte tokenizer, tokenizer.json: loadable with
``transformers.AutoModelForCausalLM.from_pretrained(DIR)``, no custom code. Mapping and
refusals: research/models/hf_export.py. Prints a JSON summary.
Exit codes: 0 done; 1 error (one line on stderr).
"""

import json
import sys

from absl import app, flags

from research import runtime

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run to export (its --workdir).')
_OUT = flags.DEFINE_string('out', None, 'Output directory (new or empty).')
_STEP = flags.DEFINE_integer('step', -1, 'Checkpoint step (-1: latest).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value or not _OUT.value:
    raise runtime.UserError('--workdir=RUN and --out=DIR are required.')
  from research.models import hf_export
  print(json.dumps(hf_export.export_run(_WORKDIR.value, _OUT.value, _STEP.value)))


if __name__ == '__main__':
  runtime.setup()
  sys.exit(runtime.run_main(main))
