import streamlit as st

st.set_page_config(page_title="FER Studio", layout="wide")
st.title("FER Studio")
st.write("Train, track, evaluate and serve facial-emotion-recognition models.")
