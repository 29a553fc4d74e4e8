"""Run a training script with trainer.Run.save frozen at one step, after the checkpoint's shards
are written and before its meta.json, so a test can kill it exactly there:

    python tests/hang_in_save.py STEP pretrain.py [args ...]
"""
import os
import runpy
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import trainer  # noqa: E402

hang_step, script, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
write_json_atomic = trainer._write_json_atomic


def hanging_write(path, obj):
    if os.path.basename(path) == 'meta.json' and obj.get('step') == hang_step:
        time.sleep(3600)
    write_json_atomic(path, obj)


trainer._write_json_atomic = hanging_write
sys.argv = [script, *args]
runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
