# Sourced by scripts/run_lwm_{text,vision}_stage.sh after their stage table: turns the paper's
# length, steps and warmup of one stage into the run's, through the scale-down knobs (all
# default to the paper's run), and sets batch, chunk, milestone frequency and mesh.
# In: length steps warmup, and the knobs length_divisor min_length steps_divisor batch_tokens
#     chunk_size (save_milestone_freq, mesh_dim when set).  Out: length steps warmup batch chunk
#     save_milestone_freq mesh_dim.
length=$(( length / length_divisor )); length=$(( length > min_length ? length : min_length ))
steps=$(( steps / steps_divisor )); steps=$(( steps > 1 ? steps : 1 ))
warmup=$(( warmup / steps_divisor )); warmup=$(( warmup > 1 ? warmup : 1 ))
warmup=$(( warmup < steps ? warmup : steps - 1 ))  # the schedule needs warmup < steps (0 for a 1-step stage)
batch=$(( batch_tokens / length )); batch=$(( batch > 1 ? batch : 1 ))
chunk=$(( chunk_size < length ? chunk_size : length ))
save_milestone_freq="${save_milestone_freq:-$(( steps / 4 > 1 ? steps / 4 : 1 ))}"
sp=$(( length / 32768 > 1 ? length / 32768 : 1 ))  # one sp shard per 32K tokens of the stage's length
mesh_dim="${mesh_dim:-1,-1,1,$sp}"  # dp,fsdp,tp,sp: sp splits each sequence over a ring
